// Counter-based Gaussian noise on the device: Philox4x32-10 + Box-Muller, bit-identical to the
// definition in tools/reference/philox.py and to the CPU implementation in src/philox.rs.
//
// Include this from any kernel that needs noise (kernels/philox.cu fills a buffer; fused kernels
// draw their own noise in-register with philox_normal / philox_normal4).
//
// Bit-exactness rules, do not relax them:
// - every float operation is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __fsub_rn,
//   __fdiv_rn, __fsqrt_rn), which nvcc/NVRTC never contract into FMA nor replace by approximations;
// - the operations run in exactly the order written in philox.py;
// - constants are bit patterns (__int_as_float), so no decimal conversion is involved.
#pragma once

// Philox4x32-10 (Salmon et al., SC'11): the 128-bit counter encrypted under the 64-bit key.
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key.x += 0x9E3779B9u;
            key.y += 0xBB67AE85u;
        }
        const unsigned int hi0 = __umulhi(0xD2511F53u, ctr.x), lo0 = 0xD2511F53u * ctr.x;
        const unsigned int hi1 = __umulhi(0xCD9E8D57u, ctr.z), lo1 = 0xCD9E8D57u * ctr.z;
        ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    }
    return ctr;
}

// (2 * (bits >> 9) + 1) * 2^-24: an odd multiple of 2^-24 in (0, 1), exact.
__device__ __forceinline__ float philox_uniform(unsigned int bits) {
    const unsigned int odd = ((bits >> 9) << 1) | 1u;
    return __fmul_rn(__uint2float_rn(odd), __int_as_float(0x33800000));
}

// ln(u) for the generator's u in (0, 1): u = 2^e * m, m in (sqrt(2)/2, sqrt(2)], atanh series in
// s = (m - 1) / (m + 1): ln(m) = s * (2 + z*(2/3 + z*(2/5 + z*(2/7 + z*2/9)))), z = s^2.
__device__ __forceinline__ float philox_ln(float u) {
    const unsigned int bits = __float_as_uint(u);
    int exponent = (int)((bits >> 23) & 0xFFu) - 127;
    float m = __uint_as_float((bits & 0x7FFFFFu) | 0x3F800000u);
    if (m > __int_as_float(0x3FB504F3)) {  // sqrt(2)
        m = __fmul_rn(m, __int_as_float(0x3F000000));  // * 0.5, exact
        exponent += 1;
    }
    const float one = __int_as_float(0x3F800000);
    const float s = __fdiv_rn(__fsub_rn(m, one), __fadd_rn(m, one));
    const float z = __fmul_rn(s, s);
    float p = __int_as_float(0x3E638E39);
    p = __fadd_rn(__fmul_rn(p, z), __int_as_float(0x3E924925));
    p = __fadd_rn(__fmul_rn(p, z), __int_as_float(0x3ECCCCCD));
    p = __fadd_rn(__fmul_rn(p, z), __int_as_float(0x3F2AAAAB));
    p = __fadd_rn(__fmul_rn(p, z), __int_as_float(0x40000000));
    const float log_m = __fmul_rn(s, p);
    const float e = __int2float_rn(exponent);
    // ln(2) = LN2_HI + LN2_LO with e * LN2_HI exact for |e| <= 24.
    return __fadd_rn(__fmul_rn(e, __int_as_float(0x3F317200)),
                     __fadd_rn(__fmul_rn(e, __int_as_float(0x35BFBE8E)), log_m));
}

// sin(2 pi u) and cos(2 pi u) for u in (0, 1), reduced exactly to |x| <= pi/4 by quarter turns.
__device__ __forceinline__ void philox_sincos_2pi(float u, float* sin_out, float* cos_out) {
    const int q = (int)floorf(__fadd_rn(__fmul_rn(u, __int_as_float(0x40800000)), __int_as_float(0x3F000000)));
    const float f = __fsub_rn(u, __fmul_rn(__int2float_rn(q), __int_as_float(0x3E800000)));  // exact
    const float x = __fmul_rn(f, __int_as_float(0x40C90FDB));  // 2 pi
    const float x2 = __fmul_rn(x, x);
    // sin(x) = x + x^3 * (-1/6 + x^2*(1/120 + x^2*(-1/5040 + x^2/362880)))
    float ps = __int_as_float(0x3638EF1D);
    ps = __fadd_rn(__fmul_rn(ps, x2), __int_as_float(0xB9500D01));
    ps = __fadd_rn(__fmul_rn(ps, x2), __int_as_float(0x3C088889));
    ps = __fadd_rn(__fmul_rn(ps, x2), __int_as_float(0xBE2AAAAB));
    const float s = __fadd_rn(x, __fmul_rn(__fmul_rn(x, x2), ps));
    // cos(x) = 1 + x^2 * (-1/2 + x^2*(1/24 + x^2*(-1/720 + x^2*(1/40320 - x^2/3628800))))
    float pc = __int_as_float(0xB493F27E);
    pc = __fadd_rn(__fmul_rn(pc, x2), __int_as_float(0x37D00D01));
    pc = __fadd_rn(__fmul_rn(pc, x2), __int_as_float(0xBAB60B61));
    pc = __fadd_rn(__fmul_rn(pc, x2), __int_as_float(0x3D2AAAAB));
    pc = __fadd_rn(__fmul_rn(pc, x2), __int_as_float(0xBF000000));
    const float c = __fadd_rn(__int_as_float(0x3F800000), __fmul_rn(x2, pc));
    switch (q & 3) {
        case 0: *sin_out = s; *cos_out = c; break;
        case 1: *sin_out = c; *cos_out = -s; break;
        case 2: *sin_out = -s; *cos_out = -c; break;
        default: *sin_out = -c; *cos_out = s; break;
    }
}

// Box-Muller on two Philox words: (radius * cos, radius * sin) for the even and odd lane.
__device__ __forceinline__ float2 philox_box_muller(unsigned int first, unsigned int second) {
    const float radius = __fsqrt_rn(__fmul_rn(__int_as_float(0xC0000000), philox_ln(philox_uniform(first))));
    float s, c;
    philox_sincos_2pi(philox_uniform(second), &s, &c);
    return make_float2(__fmul_rn(radius, c), __fmul_rn(radius, s));
}

// The four Philox words of elements 4*block .. 4*block+3 under (seed, stream).
__device__ __forceinline__ uint4 philox_words(unsigned long long seed, unsigned long long stream,
                                              unsigned long long block) {
    const uint4 ctr = make_uint4((unsigned int)block, (unsigned int)(block >> 32), (unsigned int)stream,
                                 (unsigned int)(stream >> 32));
    return philox4x32_10(ctr, make_uint2((unsigned int)seed, (unsigned int)(seed >> 32)));
}

// The four normals of elements 4*block .. 4*block+3 under (seed, stream).
__device__ __forceinline__ float4 philox_normal4(unsigned long long seed, unsigned long long stream,
                                                 unsigned long long block) {
    const uint4 r = philox_words(seed, stream, block);
    const float2 lo = philox_box_muller(r.x, r.y);
    const float2 hi = philox_box_muller(r.z, r.w);
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// Element `index` of the standard normal noise under (seed, stream). Evaluates only the
// Box-Muller pair the element belongs to; a kernel that needs all four elements of a block
// should call philox_normal4 instead.
__device__ __forceinline__ float philox_normal(unsigned long long seed, unsigned long long stream,
                                               unsigned long long index) {
    const uint4 r = philox_words(seed, stream, index >> 2);
    const bool upper_pair = (index & 2) != 0;
    const float2 z = philox_box_muller(upper_pair ? r.z : r.x, upper_pair ? r.w : r.y);
    return (index & 1) ? z.y : z.x;
}
