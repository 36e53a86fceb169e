// Segmentation losses (docs/model.md §4.1): BCE with logits (mean over all pixels) and soft Dice over
// groups of pixels (MONAI's row-wise quirk or per image), forward and backward.
// Launchers and CPU reference: src/ops/loss.rs.
#include "block_reduce.cuh"

__device__ __forceinline__ float sigmoid_of(float x) { return 1.0f / (1.0f + expf(-x)); }

// PyTorch's stable BCEWithLogits term: max(x, 0) - x*y + log1p(exp(-|x|)).
__device__ __forceinline__ float bce_term(float x, float y) {
    return fmaxf(x, 0.0f) - x * y + log1pf(expf(-fabsf(x)));
}

// First pass of the BCE mean: block b writes the sum of the terms its threads visit in a
// grid-stride loop to partial[b]. The grid depends only on n, so the result is deterministic.
extern "C" __global__ void bce_partial(float* __restrict__ partial, const float* __restrict__ x,
                                       const float* __restrict__ y, long n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        s += bce_term(x[i], y[i]);
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// dx = dy[0] * (sigmoid(x) - y) / n; dy is the scalar gradient of the mean, read on the device.
extern "C" __global__ void bce_backward(float* __restrict__ dx, const float* __restrict__ x,
                                        const float* __restrict__ y, const float* __restrict__ dy, long n,
                                        float inv_n) {
    const float g = dy[0] * inv_n;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        dx[i] = g * (sigmoid_of(x[i]) - y[i]);
    }
}

// Dice groups. An image holds `groups_per_image + skip` consecutive slabs of `len` pixels; the
// first `skip` slabs are dropped. Rows mode: slab = one image row (len = W, skip = 1: MONAI's
// include_background=False on [B, H, W] drops row 0). Image mode: one slab of H*W, skip = 0.
__device__ __forceinline__ long dice_group_offset(long group, int groups_per_image, int skip, int len) {
    const long image = group / groups_per_image;
    const long slab = group % groups_per_image + skip;
    return (image * (groups_per_image + skip) + slab) * len;
}

// One block per group: numerator = 2*sum(p*y) + smooth, denominator = sum(p) + sum(y) + smooth,
// dice = 1 - numerator / denominator, p = sigmoid(x). The two sums are saved for the backward.
extern "C" __global__ void dice_groups_forward(float* __restrict__ dice, float* __restrict__ numerator,
                                               float* __restrict__ denominator, const float* __restrict__ x,
                                               const float* __restrict__ y, int groups_per_image, int skip,
                                               int len, float smooth) {
    __shared__ float scratch[32];
    const long group = blockIdx.x;
    const long start = dice_group_offset(group, groups_per_image, skip, len);
    float overlap = 0.0f, p_sum = 0.0f, y_sum = 0.0f;
    for (int c = threadIdx.x; c < len; c += blockDim.x) {
        const float p = sigmoid_of(x[start + c]);
        const float t = y[start + c];
        overlap += p * t;
        p_sum += p;
        y_sum += t;
    }
    overlap = block_sum(overlap, scratch);
    p_sum = block_sum(p_sum, scratch);
    y_sum = block_sum(y_sum, scratch);
    if (threadIdx.x == 0) {
        const float num = 2.0f * overlap + smooth;
        const float den = p_sum + y_sum + smooth;
        numerator[group] = num;
        denominator[group] = den;
        dice[group] = 1.0f - num / den;
    }
}

// dx[i] = dy[0] / groups * d(1 - num/den)/dp * p(1 - p) for pixels of a kept group, 0 for
// pixels of a dropped slab: d(1 - num/den)/dp = (num - 2*y*den) / den^2.
extern "C" __global__ void dice_groups_backward(float* __restrict__ dx, const float* __restrict__ x,
                                                const float* __restrict__ y, const float* __restrict__ numerator,
                                                const float* __restrict__ denominator, const float* __restrict__ dy,
                                                long n, int groups_per_image, int skip, int len, float inv_groups) {
    const float g = dy[0] * inv_groups;
    const long image_len = (long)(groups_per_image + skip) * len;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long image = i / image_len;
        const long slab = (i % image_len) / len;
        if (slab < skip) {
            dx[i] = 0.0f;
            continue;
        }
        const long group = image * groups_per_image + slab - skip;
        const float num = numerator[group], den = denominator[group];
        const float p = sigmoid_of(x[i]);
        dx[i] = g * (num - 2.0f * y[i] * den) / (den * den) * p * (1.0f - p);
    }
}
