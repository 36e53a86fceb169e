// Batch normalisation over channels-last activations seen as [rows, C] (PyTorch's BatchNorm2d on
// NHWC: statistics over every dimension but the channel), forward and backward.
// Launchers and the CPU reference: src/ops/batchnorm.rs.
//
// Per-channel reductions are two-stage and atomic-free: blocks of (32, CHUNK_THREADS_Y) threads
// each reduce one chunk of rows for 32 adjacent channels (a warp reads 128 contiguous bytes of a
// row) and write one partial per (chunk, channel); a second kernel combines the partials of each
// channel in chunk order. Every summation order is fixed, so results are bit-reproducible.

#define CHUNK_THREADS_Y 8

// Adds the CHUNK_THREADS_Y values of column threadIdx.x in `tile` in row order and returns the
// sum to every thread of the block. `tile` is reused by the next call, hence the barriers.
__device__ __forceinline__ float column_sum(float (*tile)[33], float v) {
    __syncthreads();  // a previous call may still be reading the tile
    tile[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    float s = 0.0f;
    for (int k = 0; k < CHUNK_THREADS_Y; ++k) s += tile[k][threadIdx.x];
    return s;
}

// Stage 1 of the statistics: for the rows [chunk * rows_per_chunk, +rows_per_chunk) and channel
// col, the chunk's mean and the sum of squared deviations from it (M2), by two passes over the
// chunk (the second pass reads what the first left in cache). Deviations from the chunk's own
// mean keep M2 accurate when the channel has a large common offset, which E[x^2] - E[x]^2 would
// lose to cancellation.
extern "C" __global__ void batch_norm_stats_partial(float* __restrict__ partial_mean, float* __restrict__ partial_m2,
                                                    const float* __restrict__ x, int rows, int channels,
                                                    int rows_per_chunk) {
    __shared__ float tile[CHUNK_THREADS_Y][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int chunk = blockIdx.y;
    const int first = chunk * rows_per_chunk;
    const int last = min(rows, first + rows_per_chunk);
    const bool active = col < channels;

    float s = 0.0f;
    if (active)
        for (int r = first + threadIdx.y; r < last; r += CHUNK_THREADS_Y) s += x[(long)r * channels + col];
    const float mean = column_sum(tile, s) / (float)(last - first);

    float m2 = 0.0f;
    if (active)
        for (int r = first + threadIdx.y; r < last; r += CHUNK_THREADS_Y) {
            const float d = x[(long)r * channels + col] - mean;
            m2 += d * d;
        }
    m2 = column_sum(tile, m2);
    if (threadIdx.y == 0 && active) {
        partial_mean[(long)chunk * channels + col] = mean;
        partial_m2[(long)chunk * channels + col] = m2;
    }
}

// Stage 2: one thread per channel merges the chunks in order with Chan et al.'s pairwise rule
//   n = na + nb, delta = mean_b - mean_a, mean = mean_a + delta * nb / n,
//   M2 = M2_a + M2_b + delta^2 * na * nb / n,
// and writes the mean and the biased variance M2 / rows. Chunk k holds rows_per_chunk rows, the
// last one the remainder.
extern "C" __global__ void batch_norm_stats_finish(float* __restrict__ mean_out, float* __restrict__ var_out,
                                                   const float* __restrict__ partial_mean,
                                                   const float* __restrict__ partial_m2, int rows, int channels,
                                                   int rows_per_chunk, int chunks) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < channels; c += gridDim.x * blockDim.x) {
        float n = (float)min(rows_per_chunk, rows);
        float mean = partial_mean[c];
        float m2 = partial_m2[c];
        for (int k = 1; k < chunks; ++k) {
            const float nb = (float)(min(rows, (k + 1) * rows_per_chunk) - k * rows_per_chunk);
            const float total = n + nb;
            const float delta = partial_mean[(long)k * channels + c] - mean;
            mean += delta * (nb / total);
            m2 += partial_m2[(long)k * channels + c] + delta * delta * (n * (nb / total));
            n = total;
        }
        mean_out[c] = mean;
        var_out[c] = m2 / (float)rows;
    }
}

// y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c], with either the batch statistics
// (training) or the running ones (evaluation). Subtracting the mean first, rather than folding
// everything into one x * scale + shift, keeps inputs with a large offset exact to the last bits.
extern "C" __global__ void batch_norm_apply(float* __restrict__ y, const float* __restrict__ x,
                                            const float* __restrict__ mean, const float* __restrict__ var,
                                            const float* __restrict__ weight, const float* __restrict__ bias,
                                            float eps, int rows, int channels) {
    const long n = (long)rows * channels;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const float rstd = 1.0f / sqrtf(var[c] + eps);
        y[idx] = (x[idx] - mean[c]) * rstd * weight[c] + bias[c];
    }
}

// Stage 1 of the backward's per-channel sums over a chunk of rows: sum dy (the bias gradient) and
// sum dy * xhat with xhat = (x - mean) / sqrt(var + eps) (the weight gradient).
extern "C" __global__ void batch_norm_grad_sums_partial(float* __restrict__ partial_dy,
                                                        float* __restrict__ partial_dy_xhat,
                                                        const float* __restrict__ x, const float* __restrict__ dy,
                                                        const float* __restrict__ mean,
                                                        const float* __restrict__ var, float eps, int rows,
                                                        int channels, int rows_per_chunk) {
    __shared__ float tile[CHUNK_THREADS_Y][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int chunk = blockIdx.y;
    const int first = chunk * rows_per_chunk;
    const int last = min(rows, first + rows_per_chunk);
    const bool active = col < channels;

    float s_dy = 0.0f, s_dy_xhat = 0.0f;
    if (active) {
        const float mu = mean[col];
        const float rstd = 1.0f / sqrtf(var[col] + eps);
        for (int r = first + threadIdx.y; r < last; r += CHUNK_THREADS_Y) {
            const long at = (long)r * channels + col;
            const float g = dy[at];
            s_dy += g;
            s_dy_xhat += g * ((x[at] - mu) * rstd);
        }
    }
    s_dy = column_sum(tile, s_dy);
    s_dy_xhat = column_sum(tile, s_dy_xhat);
    if (threadIdx.y == 0 && active) {
        partial_dy[(long)chunk * channels + col] = s_dy;
        partial_dy_xhat[(long)chunk * channels + col] = s_dy_xhat;
    }
}

// Stage 2: one thread per channel adds the chunks' partials in chunk order.
extern "C" __global__ void batch_norm_grad_sums_finish(float* __restrict__ sum_dy, float* __restrict__ sum_dy_xhat,
                                                       const float* __restrict__ partial_dy,
                                                       const float* __restrict__ partial_dy_xhat, int channels,
                                                       int chunks) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < channels; c += gridDim.x * blockDim.x) {
        float a = 0.0f, b = 0.0f;
        for (int k = 0; k < chunks; ++k) {
            a += partial_dy[(long)k * channels + c];
            b += partial_dy_xhat[(long)k * channels + c];
        }
        sum_dy[c] = a;
        sum_dy_xhat[c] = b;
    }
}

// Input gradient. Training (sum_dy and sum_dy_xhat given; the statistics are the batch's, which
// depend on x):
//   dx = weight * rstd * (dy - sum_dy / rows - xhat * sum_dy_xhat / rows).
// Evaluation (both null; the running statistics are constants): dx = weight * rstd * dy.
extern "C" __global__ void batch_norm_backward_input(float* __restrict__ dx, const float* __restrict__ x,
                                                     const float* __restrict__ dy, const float* __restrict__ mean,
                                                     const float* __restrict__ var,
                                                     const float* __restrict__ weight,
                                                     const float* __restrict__ sum_dy,
                                                     const float* __restrict__ sum_dy_xhat, float eps, int rows,
                                                     int channels) {
    const long n = (long)rows * channels;
    const float inv_rows = 1.0f / (float)rows;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const float rstd = 1.0f / sqrtf(var[c] + eps);
        float g = dy[idx];
        if (sum_dy) {
            const float xhat = (x[idx] - mean[c]) * rstd;
            g = g - sum_dy[c] * inv_rows - xhat * (sum_dy_xhat[c] * inv_rows);
        }
        dx[idx] = weight[c] * rstd * g;
    }
}
