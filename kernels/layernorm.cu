// LayerNorm over the last dimension (PyTorch semantics: biased variance, eps inside the sqrt),
// optionally fused with a residual add, and its backward.
// Launchers and CPU reference: src/ops/layernorm.rs.
#include "block_reduce.cuh"

// One block per row. s = x + residual when `residual` is not null (then written to `sum_out`),
// otherwise s = x. y = (s - mean) * rstd * weight + bias, with rstd = 1 / sqrt(var + eps).
// The variance is taken around the mean in a second pass (not E[s^2] - mean^2), so rows with a
// large common offset keep their precision. The row is re-read from global memory on each pass;
// a few KB per row stay in L1/L2 between passes.
extern "C" __global__ void layer_norm_forward(float* __restrict__ y, float* __restrict__ sum_out,
                                              float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                              const float* __restrict__ x, const float* __restrict__ residual,
                                              const float* __restrict__ weight, const float* __restrict__ bias,
                                              int cols, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    const float* rr = residual ? residual + row * cols : nullptr;

    float total = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xr[c] + (rr ? rr[c] : 0.0f);
        if (rr) sum_out[row * cols + c] = v;
        total += v;
    }
    const float mean = block_sum(total, scratch) / (float)cols;

    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = xr[c] + (rr ? rr[c] : 0.0f) - mean;
        squares += d * d;
    }
    const float rstd = 1.0f / sqrtf(block_sum(squares, scratch) / (float)cols + eps);

    float* yr = y + row * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xr[c] + (rr ? rr[c] : 0.0f);
        yr[c] = (v - mean) * rstd * weight[c] + bias[c];
    }
    if (threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// One block per row: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight and
// xhat = (x - mean) * rstd, `x` being the normalised input (the sum s for the fused op).
extern "C" __global__ void layer_norm_backward_input(float* __restrict__ dx, const float* __restrict__ x,
                                                     const float* __restrict__ weight,
                                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                                     const float* __restrict__ dy, int cols) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    const float* dyr = dy + row * cols;
    const float mu = mean[row], rs = rstd[row];

    float g_sum = 0.0f, gx_sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float g = dyr[c] * weight[c];
        g_sum += g;
        gx_sum += g * (xr[c] - mu) * rs;
    }
    const float g_mean = block_sum(g_sum, scratch) / (float)cols;
    const float gx_mean = block_sum(gx_sum, scratch) / (float)cols;

    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float xhat = (xr[c] - mu) * rs;
        dx[row * cols + c] = rs * (dyr[c] * weight[c] - g_mean - xhat * gx_mean);
    }
}

// First stage of dweight = sum_rows(dy * xhat) and dbias = sum_rows(dy).
// Block (32, PARAM_ROWS_PER_PASS): threadIdx.x picks a column of a 32-column tile (blockIdx.x),
// so each warp reads 128 contiguous bytes of a row; threadIdx.y strides over the rows of chunk
// blockIdx.y ([chunk * rows_per_chunk, +rows_per_chunk)). Per-chunk partial sums go to
// partial_dw / partial_db laid out [chunks, cols]; layer_norm_param_grads_finish adds them up.
// Fixed summation order throughout, so the result is deterministic.
#define PARAM_ROWS_PER_PASS 8
extern "C" __global__ void layer_norm_param_grads_partial(float* __restrict__ partial_dw, float* __restrict__ partial_db,
                                                          const float* __restrict__ x, const float* __restrict__ mean,
                                                          const float* __restrict__ rstd, const float* __restrict__ dy,
                                                          int rows, int cols, int rows_per_chunk) {
    __shared__ float tile_dw[PARAM_ROWS_PER_PASS][33];
    __shared__ float tile_db[PARAM_ROWS_PER_PASS][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int chunk = blockIdx.y;
    const int first = chunk * rows_per_chunk;
    const int last = min(rows, first + rows_per_chunk);

    float dw = 0.0f, db = 0.0f;
    if (col < cols) {
        for (int r = first + threadIdx.y; r < last; r += PARAM_ROWS_PER_PASS) {
            const long at = (long)r * cols + col;
            const float g = dy[at];
            dw += g * (x[at] - mean[r]) * rstd[r];
            db += g;
        }
    }
    tile_dw[threadIdx.y][threadIdx.x] = dw;
    tile_db[threadIdx.y][threadIdx.x] = db;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        for (int k = 1; k < PARAM_ROWS_PER_PASS; ++k) {
            dw += tile_dw[k][threadIdx.x];
            db += tile_db[k][threadIdx.x];
        }
        partial_dw[(long)chunk * cols + col] = dw;
        partial_db[(long)chunk * cols + col] = db;
    }
}

// Second stage: one thread per column sums the `chunks` partial rows in order.
extern "C" __global__ void layer_norm_param_grads_finish(float* __restrict__ dweight, float* __restrict__ dbias,
                                                         const float* __restrict__ partial_dw,
                                                         const float* __restrict__ partial_db, int chunks, int cols) {
    for (int col = blockIdx.x * blockDim.x + threadIdx.x; col < cols; col += gridDim.x * blockDim.x) {
        float dw = 0.0f, db = 0.0f;
        for (int k = 0; k < chunks; ++k) {
            dw += partial_dw[(long)k * cols + col];
            db += partial_db[(long)k * cols + col];
        }
        dweight[col] = dw;
        dbias[col] = db;
    }
}
