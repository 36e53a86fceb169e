// Dropout with a mask drawn from Philox and never stored: element i is kept when
// philox_uniform(word i of (seed, stream)) >= p, and y[i] = x[i] * (kept ? scale : 0) with
// scale = 1 / (1 - p). The backward applies the same function to dy, regenerating the mask.
// Launcher and CPU reference: src/ops/dropout.rs; generator: philox.cuh / src/philox.rs.
//
// The CPU and this kernel agree bit for bit: the mask is integer arithmetic plus philox_uniform
// (an exact int->float conversion of a 24-bit odd integer times 2^-24) compared exactly with p,
// and the output is one correctly rounded multiplication by the same f32 scale.
#include "philox.cuh"

// Grid-stride over Philox blocks: one 4-word draw serves elements 4*block .. 4*block+3.
extern "C" __global__ void dropout_apply(float* __restrict__ y, const float* __restrict__ x, unsigned long long n,
                                         float p, float scale, unsigned long long seed, unsigned long long stream) {
    const unsigned long long blocks = (n + 3) / 4;
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long block = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; block < blocks;
         block += step) {
        const uint4 r = philox_words(seed, stream, block);
        const unsigned int words[4] = {r.x, r.y, r.z, r.w};
        const unsigned long long first = 4 * block;
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
            const unsigned long long i = first + lane;
            if (i < n) y[i] = __fmul_rn(x[i], philox_uniform(words[lane]) >= p ? scale : 0.0f);
        }
    }
}
