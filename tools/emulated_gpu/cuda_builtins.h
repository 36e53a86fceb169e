// The CUDA built-ins that kernels/*.cu use, for compiling those files unchanged as host C++ in the
// emulated GPU (docs/emulated_gpu.md). tools/emulated_gpu.sh includes this header ahead of each
// kernel family; nothing here is seen by nvcc or NVRTC.
//
// Per-thread state (threadIdx, blockIdx, ...) is read from the fiber the emulator is running;
// barriers and warp shuffles call into the emulator's scheduler, which runs every thread of a
// block as a fiber so that they mean what they mean on the GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu_abi.h"

// ---- declaration specifiers -------------------------------------------------------------------
// Kernels are `extern "C"` already; they only need to be visible to the emulator's dlsym.
#ifdef MCS_EMU_SCAN
// tools/emulated_gpu.sh preprocesses each family with this defined to list its kernels and its
// dynamic shared memory: the markers survive preprocessing, macro-generated kernels included.
#define __global__ __mcs_emu_kernel__
#define __shared__ __mcs_emu_shared__
#else
#define __global__ __attribute__((visibility("default")))
#define __shared__ thread_local
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
// __shared__ (above) is `thread_local`: at block scope that implies `static`, one copy per host
// thread, and the emulator runs a block's threads as fibers of one host thread, so the copy is the
// block's shared memory. It is also valid after `extern` (dynamic shared memory, defined by the
// generated family file).

// ---- thread geometry --------------------------------------------------------------------------
#define threadIdx (mcs_emu_current->thread_idx)
#define blockIdx (mcs_emu_current->block_idx)
#define blockDim (mcs_emu_current->block_dim)
#define gridDim (mcs_emu_current->grid_dim)
#define warpSize 32

// ---- synchronisation ----------------------------------------------------------------------------
#define __syncthreads() mcs_emu_syncthreads(__FILE__, __LINE__)

// The real intrinsic's trailing `width` (default warpSize) stays optional: the call site's file and
// line come first so that the default argument can stay last.
template <typename T>
inline T mcs_emu_shfl_xor_call(const char* file, int line, unsigned mask, T value, int lane_mask, int width = 32) {
    static_assert(sizeof(T) == 4, "the emulated shuffle moves 32-bit values");
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    bits = mcs_emu_shfl_xor(mask, bits, lane_mask, width, file, line);
    std::memcpy(&value, &bits, 4);
    return value;
}
#define __shfl_xor_sync(...) mcs_emu_shfl_xor_call(__FILE__, __LINE__, __VA_ARGS__)

// ---- vector types -------------------------------------------------------------------------------
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---- bit casts and integer intrinsics -------------------------------------------------------------
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

// ---- explicitly rounded float arithmetic (round to nearest even: the host's default mode, and the
// kernels are compiled without FMA contraction, so each is one correctly rounded operation) --------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __int2float_rn(int v) { return (float)v; }
inline float __uint2float_rn(unsigned v) { return (float)v; }

// ---- math: the single-precision overloads of <cmath> (expf, logf, ...) are C functions already;
// min and max are CUDA's integer and float overloads ---------------------------------------------
using std::ceil;
using std::floor;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
