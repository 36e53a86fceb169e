// Row softmax and log-softmax over the last dimension, forward and backward.
// One block per row; threads stride over the columns. CPU reference: src/ops/softmax.rs.
#include "block_reduce.cuh"

// y[r, :] = softmax(x[r, :] + mask[r / rows_per_mask_row, :]); `mask` may be null.
// The additive mask is shared by consecutive groups of rows (for attention scores laid out as
// [batch, heads * queries, keys] with a [batch, keys] padding mask, rows_per_mask_row = heads * queries).
extern "C" __global__ void softmax_forward(float* __restrict__ y, const float* __restrict__ x,
                                           const float* __restrict__ mask, int cols, int rows_per_mask_row) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    const float* mr = mask ? mask + (row / rows_per_mask_row) * cols : nullptr;
    float* yr = y + row * cols;

    float m = neg_infinity();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, xr[c] + (mr ? mr[c] : 0.0f));
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float e = expf(xr[c] + (mr ? mr[c] : 0.0f) - m);
        yr[c] = e;
        s += e;
    }
    s = block_sum(s, scratch);
    const float inv = 1.0f / s;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] *= inv;
}

// dx = y * (dy - sum(dy * y)) per row.
extern "C" __global__ void softmax_backward(float* __restrict__ dx, const float* __restrict__ y,
                                            const float* __restrict__ dy, int cols) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* yr = y + row * cols;
    const float* dyr = dy + row * cols;
    const float dot = block_row_dot(dyr, yr, cols, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dx[row * cols + c] = yr[c] * (dyr[c] - dot);
}

// y = x - max - log(sum(exp(x - max))) per row.
extern "C" __global__ void log_softmax_forward(float* __restrict__ y, const float* __restrict__ x, int cols) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    float m = neg_infinity();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, xr[c]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += expf(xr[c] - m);
    s = block_sum(s, scratch);
    const float shift = m + logf(s);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) y[row * cols + c] = xr[c] - shift;
}

// dx = dy - exp(y) * sum(dy) per row.
extern "C" __global__ void log_softmax_backward(float* __restrict__ dx, const float* __restrict__ y,
                                                const float* __restrict__ dy, int cols) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* yr = y + row * cols;
    const float* dyr = dy + row * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += dyr[c];
    s = block_sum(s, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dx[row * cols + c] = dyr[c] - expf(yr[c]) * s;
}
