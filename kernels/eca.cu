// ECA channel attention (ECA-Net) on NHWC activations, forward and backward:
//   p[b,c] = mean_{h,w} x[b,h,w,c]
//   g[b,c] = sigmoid(sum_j w[j] * p[b, c + j - pad])   (zero outside 0..C, pad = (k - 1) / 2)
//   y      = x * g[b,c]
// Launchers and the CPU reference: src/ops/eca.rs. No atomics: the spatial sums are per-(b, c)
// gathers in a fixed order and the weight gradient is one block-wide tree per tap.
#include "block_reduce.cuh"

#define SUM_THREADS_Y 8

// out[b,c] = scale * sum_{pixels} a[b,pixel,c] * (m ? m[b,pixel,c] : 1). Block (32, SUM_THREADS_Y):
// threadIdx.x picks a channel of the 32-channel tile blockIdx.x (a warp reads 128 contiguous
// bytes), threadIdx.y strides over the pixels, and the SUM_THREADS_Y partials are added in
// order. blockIdx.y is the image. Forward: the pooled mean (m null, scale 1/(H*W)); backward: the
// gate's gradient sum dy * x (scale 1).
extern "C" __global__ void eca_spatial_sum(float* __restrict__ out, const float* __restrict__ a,
                                           const float* __restrict__ m, int pixels, int channels, float scale) {
    __shared__ float tile[SUM_THREADS_Y][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long b = blockIdx.y;
    float s = 0.0f;
    if (c < channels) {
        const long base = b * pixels * (long)channels + c;
        for (int p = threadIdx.y; p < pixels; p += SUM_THREADS_Y) {
            const long at = base + (long)p * channels;
            s += m ? a[at] * m[at] : a[at];
        }
    }
    tile[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < channels) {
        for (int k = 1; k < SUM_THREADS_Y; ++k) s += tile[k][threadIdx.x];
        out[b * channels + c] = s * scale;
    }
}

__device__ __forceinline__ float eca_sigmoid(float z) {
    // Never exponentiates a positive number, so neither tail overflows.
    if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
    const float e = expf(z);
    return e / (1.0f + e);
}

// g[b,c] = sigmoid(sum_j w[j] p[b, c + j - pad]), one thread per (b, c), taps in order.
extern "C" __global__ void eca_gate(float* __restrict__ gate, const float* __restrict__ pooled,
                                    const float* __restrict__ weight, int batch, int channels, int taps) {
    const int pad = (taps - 1) / 2;
    const long n = (long)batch * channels;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const float* row = pooled + (idx - c);
        float z = 0.0f;
        for (int j = 0; j < taps; ++j) {
            const int src = c + j - pad;
            if (src >= 0 && src < channels) z += weight[j] * row[src];
        }
        gate[idx] = eca_sigmoid(z);
    }
}

// out = a * g[b,c] (+ add[b,c] when add is not null), over [B, pixels, C]. Forward: y = x * g.
// Backward: dx = dy * g + dp[b,c] / (H*W), the launcher passing dp already divided.
extern "C" __global__ void eca_scale(float* __restrict__ out, const float* __restrict__ a,
                                     const float* __restrict__ gate, const float* __restrict__ add, int batch,
                                     int pixels, int channels) {
    const long n = (long)batch * pixels * channels;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const long bc = (idx / ((long)pixels * channels)) * channels + c;
        float v = a[idx] * gate[bc];
        if (add) v += add[bc];
        out[idx] = v;
    }
}

// The gradient of the gate's pre-activation: dz[b,c] = dg[b,c] * g (1 - g).
__device__ __forceinline__ float eca_dz(const float* __restrict__ dgate, const float* __restrict__ gate, long at) {
    const float g = gate[at];
    return dgate[at] * (g * (1.0f - g));
}

// dp[b,c] * inv_pixels with dp[b,c] = sum_j w[j] dz[b, c - j + pad] (the convolution's transpose:
// p[b,c] fed z[b, c - j + pad] through tap j), one thread per (b, c), taps in order. The factor
// 1/(H*W) of the mean is applied here so that eca_scale only adds.
extern "C" __global__ void eca_pooled_backward(float* __restrict__ dpooled, const float* __restrict__ dgate,
                                               const float* __restrict__ gate, const float* __restrict__ weight,
                                               int batch, int channels, int taps, float inv_pixels) {
    const int pad = (taps - 1) / 2;
    const long n = (long)batch * channels;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int c = (int)(idx % channels);
        const long row = idx - c;
        float s = 0.0f;
        for (int j = 0; j < taps; ++j) {
            const int dst = c - j + pad;
            if (dst >= 0 && dst < channels) s += weight[j] * eca_dz(dgate, gate, row + dst);
        }
        dpooled[idx] = s * inv_pixels;
    }
}

// dw[j] = sum_{b,c} dz[b,c] * p[b, c + j - pad]: one block per tap j (blockIdx.x), its threads
// striding over (b, c), then a block-wide tree sum (fixed shape, so deterministic).
extern "C" __global__ void eca_weight_backward(float* __restrict__ dweight, const float* __restrict__ dgate,
                                               const float* __restrict__ gate, const float* __restrict__ pooled,
                                               int batch, int channels, int taps) {
    __shared__ float scratch[32];
    const int j = blockIdx.x;
    const int pad = (taps - 1) / 2;
    const long n = (long)batch * channels;
    float s = 0.0f;
    for (long idx = threadIdx.x; idx < n; idx += blockDim.x) {
        const int c = (int)(idx % channels);
        const int src = c + j - pad;
        if (src >= 0 && src < channels) s += eca_dz(dgate, gate, idx) * pooled[idx - c + src];
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) dweight[j] = s;
}
