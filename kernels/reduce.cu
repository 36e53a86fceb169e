// Reductions: sums/means over the last dimension and over a whole tensor, L2 normalisation of
// rows, and the broadcasts their backward rules need.
// Launchers and CPU reference: src/ops/reduce.rs.
#include "block_reduce.cuh"

// One block per row: y[row] = scale * sum(x[row, :]) (scale = 1 for a sum, 1/cols for a mean).
extern "C" __global__ void sum_rows(float* __restrict__ y, const float* __restrict__ x, int cols, float scale) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) y[row] = s * scale;
}

// dx[i] = scale * dy[i / cols] for i < n: the gradient of a row sum/mean (cols = row length) and
// of a whole-tensor sum/mean (cols = n, dy a single value).
extern "C" __global__ void broadcast_rows(float* __restrict__ dx, const float* __restrict__ dy, long n, long cols,
                                          float scale) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        dx[i] = dy[i / cols] * scale;
    }
}

// First pass of a whole-tensor sum: block b writes the sum of the elements its threads visit in
// a grid-stride loop to partial[b]. The grid size depends only on n, so the summation order (and
// the result) is the same on every run.
extern "C" __global__ void sum_all_partial(float* __restrict__ partial, const float* __restrict__ x, long n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) s += x[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Second pass, one block: out[0] = scale * sum(partial[0..count]).
extern "C" __global__ void sum_all_finish(float* __restrict__ out, const float* __restrict__ partial, int count,
                                          float scale) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = s * scale;
}

// One block per row: norm[row] = sqrt(sum(x^2)), y = x / norm. No epsilon: an all-zero row gives
// NaN, exactly like `x / x.norm(dim=-1, keepdim=True)`.
extern "C" __global__ void l2_normalize_forward(float* __restrict__ y, float* __restrict__ norm,
                                                const float* __restrict__ x, int cols) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c] * xr[c];
    const float n = sqrtf(block_sum(s, scratch));
    for (int c = threadIdx.x; c < cols; c += blockDim.x) y[row * cols + c] = xr[c] / n;
    if (threadIdx.x == 0) norm[row] = n;
}

// One block per row: dx = (dy - y * sum(dy * y)) / norm.
extern "C" __global__ void l2_normalize_backward(float* __restrict__ dx, const float* __restrict__ y,
                                                 const float* __restrict__ norm, const float* __restrict__ dy,
                                                 int cols) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* yr = y + row * cols;
    const float* dyr = dy + row * cols;
    const float dot = block_row_dot(dyr, yr, cols, scratch);
    const float n = norm[row];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dx[row * cols + c] = (dyr[c] - yr[c] * dot) / n;
}
