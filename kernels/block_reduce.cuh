// Block-wide reductions shared by the row kernels (softmax, layernorm, reduce).
// Every thread of the block must call these; the result is returned to all threads.
#pragma once

// NVRTC has no <math.h>, so no INFINITY macro.
__device__ __forceinline__ float neg_infinity() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// `scratch` holds at least 32 floats. blockDim.x must be a multiple of 32 (launchers use 128..1024).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : neg_infinity();
    return warp_max(v);
}

// sum(a[c] * b[c]) over one row of `cols`, threads striding over the columns (returned to all).
__device__ __forceinline__ float block_row_dot(const float* a, const float* b, int cols, float* scratch) {
    float dot = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += a[c] * b[c];
    return block_sum(dot, scratch);
}
