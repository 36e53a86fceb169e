// Fills a buffer with standard normal noise: out[i] = normal(seed, stream, i) for i in 0..n.
// The generator lives in philox.cuh (shared with fused kernels). Launcher: src/ops/random.rs;
// CPU reference: src/philox.rs; definition: tools/reference/philox.py.
#include "philox.cuh"

// Grid-stride over Philox blocks: each thread produces the four elements of one block per step,
// writing only the n % 4 valid ones of the last block.
extern "C" __global__ void philox_normal(float* __restrict__ out, unsigned long long n, unsigned long long seed,
                                         unsigned long long stream) {
    const unsigned long long blocks = (n + 3) / 4;
    const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    // float4 stores need 16-byte alignment; device allocations have it, offset views may not.
    const bool aligned = (reinterpret_cast<unsigned long long>(out) & 15ull) == 0;
    for (unsigned long long block = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; block < blocks;
         block += step) {
        const float4 z = philox_normal4(seed, stream, block);
        const unsigned long long i = 4 * block;
        if (aligned && i + 4 <= n) {
            reinterpret_cast<float4*>(out)[block] = z;
        } else {
            const float lanes[4] = {z.x, z.y, z.z, z.w};
            for (unsigned long long lane = 0; lane < 4 && i + lane < n; ++lane) out[i + lane] = lanes[lane];
        }
    }
}
