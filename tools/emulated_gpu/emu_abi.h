// The interface between the host-compiled kernel families (built from kernels/*.cu by
// tools/emulated_gpu.sh) and the emulated driver that runs them (runtime.cc). C linkage, so that
// the generated family libraries and the driver agree without sharing C++ types.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

struct McsEmuDim3 {
    unsigned int x, y, z;
};

// What a running GPU thread sees of itself: the fields behind threadIdx, blockIdx, blockDim, gridDim.
struct McsEmuThreadView {
    McsEmuDim3 thread_idx, block_idx, block_dim, grid_dim;
};

// The GPU thread now running (one launch runs at a time, on one host thread).
extern McsEmuThreadView* mcs_emu_current;

// __syncthreads() at file:line: returns when every thread of the block has reached it.
void mcs_emu_syncthreads(const char* file, int line);

// __shfl_xor_sync: returns `value` of lane (lane ^ lane_mask) once every lane named by `mask` has
// arrived at the shuffle.
uint32_t mcs_emu_shfl_xor(unsigned int mask, uint32_t value, int lane_mask, int width, const char* file, int line);

// One kernel of a family library: its name and a function that calls it with the argument
// pointers of cuLaunchKernel's `kernelParams`.
struct McsEmuKernel {
    const char* name;
    void (*invoke)(void** params);
};

// Exported by every family library.
typedef const McsEmuKernel* (*McsEmuKernelTableFn)(int* count);
// The calling host thread's dynamic shared memory (`extern __shared__`) and its capacity in bytes,
// or null when the family declares none.
typedef void* (*McsEmuDynamicSharedFn)(size_t* capacity);
// Touches the family's thread-local storage so that the host thread has it (its __shared__ arrays).
typedef void* (*McsEmuTlsAnchorFn)(void);
}
