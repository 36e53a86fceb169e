// DHN-NCE loss (decoupled hard-negative NCE, MedCLIP-SAMv2), forward and backward.
// Launchers and CPU reference: src/ops/dhn_nce.rs. The similarity GEMM S = v t^T / tau and the
// input gradients (dS t / tau, dS^T v / tau) are cuBLAS products made by the launchers.
//
// Per row i of S (image->text) with beta = beta_image, and per column of S (a row of S^T,
// text->image) with beta = beta_text, over the off-diagonal entries j != i only:
//   sharp_i  = LSE_{j != i}((1 + beta) S_ij)
//   smooth_i = LSE_{j != i}(beta S_ij)
//   term_i   = -S_ii + log(B - 1) + sharp_i - smooth_i
// which is -[S_ii - log sum_{j != i} w_ij exp(S_ij)] with the hard-negative weights
// w_ij = (B - 1) softmax_{j != i}(beta S_ij) written out. The loss is (sum of all 2B terms) / B.
//
// Forward: dhn_nce_log_sum_exps (one block per row, launched once per direction), then
// dhn_nce_sum (one block, a fixed-order sum of the 2B terms). Backward: dhn_nce_backward (one
// thread per entry of S). No atomics anywhere: every sum has a fixed order.
#include "block_reduce.cuh"

// One block per row of the view of S that `direction` picks: 0 reads row i of S, 1 reads column
// i (row i of S^T). Writes lse[(2 direction) B + i] = sharp_i, lse[(2 direction + 1) B + i] =
// smooth_i and terms[direction B + i] = term_i. Both log-sum-exps subtract their row's maximum,
// so no exponent is positive. Needs batch >= 2 (the launcher checks), so the maxima are finite
// for finite S.
extern "C" __global__ void dhn_nce_log_sum_exps(float* __restrict__ lse, float* __restrict__ terms,
                                                const float* __restrict__ sim, int batch, int direction,
                                                float beta, float log_negatives) {
    __shared__ float scratch[32];
    const long i = blockIdx.x;
    // Entry (i, j) of the view lies at sim[i * row_stride + j * col_stride].
    const long row_stride = direction == 0 ? batch : 1;
    const long col_stride = direction == 0 ? 1 : batch;
    const float* row = sim + i * row_stride;
    const float sharp_scale = 1.0f + beta;

    float sharp_max = neg_infinity(), smooth_max = neg_infinity();
    for (int j = threadIdx.x; j < batch; j += blockDim.x) {
        if (j == i) continue;
        const float s = row[j * col_stride];
        sharp_max = fmaxf(sharp_max, sharp_scale * s);
        smooth_max = fmaxf(smooth_max, beta * s);
    }
    sharp_max = block_max(sharp_max, scratch);
    smooth_max = block_max(smooth_max, scratch);

    float sharp_sum = 0.0f, smooth_sum = 0.0f;
    for (int j = threadIdx.x; j < batch; j += blockDim.x) {
        if (j == i) continue;
        const float s = row[j * col_stride];
        sharp_sum += expf(sharp_scale * s - sharp_max);
        smooth_sum += expf(beta * s - smooth_max);
    }
    sharp_sum = block_sum(sharp_sum, scratch);
    smooth_sum = block_sum(smooth_sum, scratch);

    if (threadIdx.x == 0) {
        const float sharp = sharp_max + logf(sharp_sum);
        const float smooth = smooth_max + logf(smooth_sum);
        lse[(2L * direction) * batch + i] = sharp;
        lse[(2L * direction + 1) * batch + i] = smooth;
        terms[(long)direction * batch + i] = -sim[i * (batch + 1L)] + log_negatives + (sharp - smooth);
    }
}

// One block: loss[0] = scale * sum_k terms[k]. Each thread sums a fixed stride of the terms,
// then the block reduction adds those partial sums in a fixed tree, so the result is the same on
// every run.
extern "C" __global__ void dhn_nce_sum(float* __restrict__ loss, const float* __restrict__ terms, int count,
                                       float scale) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int k = threadIdx.x; k < count; k += blockDim.x) acc += terms[k];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) loss[0] = acc * scale;
}

// One thread per entry (i, j) of S, g = dy[0] / B:
//   dsim[i, i] = -2 g                          (the positive appears once in each direction)
//   dsim[i, j] = g [ (1 + b1) p_ij - b1 q_ij + (1 + b2) p'_ji - b2 q'_ji ]     for j != i
// with p_ij = exp((1 + b1) S_ij - sharp_i), q_ij = exp(b1 S_ij - smooth_i) the off-diagonal
// softmaxes of row i, and p', q' the same over column j with b2. The q terms are the gradient
// through the hard-negative weights w, which are not treated as constants.
extern "C" __global__ void dhn_nce_backward(float* __restrict__ dsim, const float* __restrict__ sim,
                                            const float* __restrict__ lse, const float* __restrict__ dy,
                                            int batch, float beta_image, float beta_text) {
    const float g = dy[0] / batch;
    const long n = (long)batch * batch;
    const float* row_sharp = lse;
    const float* row_smooth = lse + batch;
    const float* col_sharp = lse + 2L * batch;
    const float* col_smooth = lse + 3L * batch;
    for (long k = (long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (long)gridDim.x * blockDim.x) {
        const long i = k / batch, j = k % batch;
        if (i == j) {
            dsim[k] = -2.0f * g;
            continue;
        }
        const float s = sim[k];
        const float image_to_text = (1.0f + beta_image) * expf((1.0f + beta_image) * s - row_sharp[i]) -
                                    beta_image * expf(beta_image * s - row_smooth[i]);
        const float text_to_image = (1.0f + beta_text) * expf((1.0f + beta_text) * s - col_sharp[j]) -
                                    beta_text * expf(beta_text * s - col_smooth[j]);
        dsim[k] = g * (image_to_text + text_to_image);
    }
}
