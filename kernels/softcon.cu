// Soft patch-level contrastive loss (docs/model.md §4.2), forward and backward.
// Launchers and CPU reference: src/ops/softcon.rs.
//
// Forward: softcon_patch_mean (one block per image: patch norms, mean of unit patch tokens P),
// then softcon_pairs (one block: the B x B logits, the soft targets, both soft cross-entropies,
// and the loss's gradient with respect to the image->text logits, saved for the backward).
// Backward: softcon_backward_mean_text (d P and d text from that gradient), then
// softcon_backward_patches (one block per patch token, through the normalisation and the mean).
#include "block_reduce.cuh"

// One block per image b. norms[b, n] = ||z[b, n, :]|| (one warp per token), then
// mean[b, :] = (1/N) sum_n z[b, n, :] / norms[b, n] (one thread per embedding column).
// No epsilon: a zero token gives NaN, as z / z.norm(dim=-1, keepdim=True) does.
extern "C" __global__ void softcon_patch_mean(float* __restrict__ mean, float* __restrict__ norms,
                                              const float* __restrict__ z, int tokens, int width) {
    const long b = blockIdx.x;
    const float* zb = z + b * tokens * width;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int n = warp; n < tokens; n += warps) {
        const float* row = zb + (long)n * width;
        float s = 0.0f;
        for (int c = lane; c < width; c += 32) s += row[c] * row[c];
        s = warp_sum(s);
        if (lane == 0) norms[b * tokens + n] = sqrtf(s);
    }
    __syncthreads();  // global writes of this block are visible to the whole block afterwards
    const float inv_tokens = 1.0f / tokens;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float acc = 0.0f;
        for (int n = 0; n < tokens; ++n) acc += zb[(long)n * width + c] / norms[b * tokens + n];
        mean[b * width + c] = acc * inv_tokens;
    }
}

// log(sum_k exp(v[k * stride])) over `count` values.
__device__ float strided_logsumexp(const float* v, int count, int stride) {
    float m = neg_infinity();
    for (int k = 0; k < count; ++k) m = fmaxf(m, v[k * stride]);
    float s = 0.0f;
    for (int k = 0; k < count; ++k) s += expf(v[k * stride] - m);
    return m + logf(s);
}

// One block. mean = P [B, E], text = t [B, E]. Scratch (global, batch*batch*2 + batch*3 floats):
// logits A = P t^T / tau, targets Y, then per row lse of A's rows, lse of A's columns (the rows
// of the text->image logits A^T) and the column sums of Y (row sums of Y^T).
//   L_i2t = -(1/B) sum_ij Y_ij log softmax_row(A)_ij
//   L_t2i = -(1/B) sum_ij (Y^T)_ij log softmax_row(A^T)_ij = -(1/B) sum_ij Y_ij (A_ij - lse_col_j)
//   loss = (L_i2t + L_t2i) / 2
//   grad[i, j] = d loss / d A_ij
//              = 1/(2B) [ (softmax_row(A)_ij - Y_ij) + (exp(A_ij - lse_col_j) * colsum(Y)_j - Y_ij) ]
// Y is a constant (no gradient flows through the targets).
extern "C" __global__ void softcon_pairs(float* __restrict__ loss, float* __restrict__ grad,
                                         float* __restrict__ scratch, const float* __restrict__ mean,
                                         const float* __restrict__ text, int batch, int width, float inv_tau) {
    __shared__ float reduce_scratch[32];
    const int pairs = batch * batch;
    float* logits = scratch;
    float* targets = scratch + pairs;
    float* lse_row = targets + pairs;
    float* lse_col = lse_row + batch;
    float* target_colsum = lse_col + batch;

    for (int k = threadIdx.x; k < pairs; k += blockDim.x) {
        const float* p = mean + (long)(k / batch) * width;
        const float* ti = text + (long)(k / batch) * width;
        const float* tj = text + (long)(k % batch) * width;
        float a = 0.0f, s = 0.0f;
        for (int c = 0; c < width; ++c) {
            a += p[c] * tj[c];
            s += ti[c] * tj[c];
        }
        logits[k] = a * inv_tau;
        targets[k] = s * inv_tau;  // S for now; becomes Y below
    }
    __syncthreads();

    // Targets: row-wise L2 normalisation of S, then a row softmax (in place).
    for (int i = threadIdx.x; i < batch; i += blockDim.x) {
        float* row = targets + (long)i * batch;
        float sq = 0.0f;
        for (int j = 0; j < batch; ++j) sq += row[j] * row[j];
        const float inv_norm = 1.0f / sqrtf(sq);
        float m = neg_infinity();
        for (int j = 0; j < batch; ++j) m = fmaxf(m, row[j] * inv_norm);
        float sum = 0.0f;
        for (int j = 0; j < batch; ++j) {
            row[j] = expf(row[j] * inv_norm - m);
            sum += row[j];
        }
        for (int j = 0; j < batch; ++j) row[j] /= sum;
        lse_row[i] = strided_logsumexp(logits + (long)i * batch, batch, 1);
        lse_col[i] = strided_logsumexp(logits + i, batch, batch);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < batch; j += blockDim.x) {
        float s = 0.0f;
        for (int i = 0; i < batch; ++i) s += targets[(long)i * batch + j];
        target_colsum[j] = s;
    }
    __syncthreads();

    const float half_inv_batch = 0.5f / batch;
    float acc = 0.0f;
    for (int k = threadIdx.x; k < pairs; k += blockDim.x) {
        const int i = k / batch, j = k % batch;
        const float a = logits[k], y = targets[k];
        acc -= y * ((a - lse_row[i]) + (a - lse_col[j]));
        grad[k] = half_inv_batch * ((expf(a - lse_row[i]) - y) + (expf(a - lse_col[j]) * target_colsum[j] - y));
    }
    acc = block_sum(acc, reduce_scratch);
    if (threadIdx.x == 0) loss[0] = acc * half_inv_batch;
}

// One thread per (row, column) of [B, E], scale = dy[0] / tau:
//   d_mean[i, c] = scale * sum_j grad[i, j] * text[j, c]
//   d_text[j, c] = scale * sum_i grad[i, j] * mean[i, c]
extern "C" __global__ void softcon_backward_mean_text(float* __restrict__ d_mean, float* __restrict__ d_text,
                                                      const float* __restrict__ grad,
                                                      const float* __restrict__ mean,
                                                      const float* __restrict__ text,
                                                      const float* __restrict__ dy, int batch, int width,
                                                      float inv_tau) {
    const float scale = dy[0] * inv_tau;
    const long n = (long)batch * width;
    for (long idx = (long)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int r = idx / width, c = idx % width;
        float dm = 0.0f, dt = 0.0f;
        for (int k = 0; k < batch; ++k) {
            dm += grad[(long)r * batch + k] * text[(long)k * width + c];
            dt += grad[(long)k * batch + r] * mean[(long)k * width + c];
        }
        d_mean[idx] = dm * scale;
        d_text[idx] = dt * scale;
    }
}

// One block per patch token (b, n), u = z / norm:
//   dz = (d_mean[b] - u * (u . d_mean[b])) / (N * norm)
extern "C" __global__ void softcon_backward_patches(float* __restrict__ dz, const float* __restrict__ z,
                                                    const float* __restrict__ norms,
                                                    const float* __restrict__ d_mean, int tokens, int width) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const long b = row / tokens;
    const float* zr = z + row * width;
    const float* g = d_mean + b * width;
    const float norm = norms[row];
    const float dot = block_row_dot(zr, g, width, scratch) / norm;  // u . d_mean[b]
    const float scale = 1.0f / (tokens * norm);
    for (int c = threadIdx.x; c < width; c += blockDim.x) dz[row * width + c] = (g[c] - zr[c] / norm * dot) * scale;
}
