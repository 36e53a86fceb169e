"""Counter-based Gaussian noise shared by the Rust CPU backend, the CUDA kernels and this reference.

The engine draws every random number of MedCLIPSeg (the reparameterised V sample in each PVL
attention) from this generator, so a stochastic forward pass is reproducible bit for bit and
comparable across backends. The counterparts are `src/philox.rs` (CPU) and `kernels/philox.cuh`
(GPU); the three must stay identical.

Definition
----------
normal(seed, stream, i) for element i of a tensor drawn under (seed: u64, stream: u64):
  1. Philox4x32-10 (Salmon et al., SC'11) on counter (lo32(i//4), hi32(i//4), lo32(stream),
     hi32(stream)) with key (lo32(seed), hi32(seed)) gives four 32-bit words r0..r3.
  2. Lane i % 4 uses the pair (r0, r1) for lanes 0-1 and (r2, r3) for lanes 2-3 (Box-Muller):
     u1 = uniform(first), u2 = uniform(second), radius = sqrt(-2 ln u1),
     lane even -> radius * cos(2 pi u2), lane odd -> radius * sin(2 pi u2).
  3. uniform(x) = (2 * (x >> 9) + 1) * 2^-24: an odd multiple of 2^-24 in (0, 1), exact in f32.
  4. ln and sin/cos are evaluated by the fixed f32 polynomials below using only IEEE-rounded
     +, -, *, / and sqrt in the written order (no fused multiply-add). Every backend therefore
     produces the same bits, unlike library logf/sinf/cosf, which differ in the last ulp.

Stream ids used by the model: stream = (draw << 16) | (adapter << 1) | direction, where
direction 0 is image->text attention, 1 is text->image, adapter is the PVL adapter index, and draw
is the Monte-Carlo sample index (inference) or the training step (training).
"""

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def f32(bits):
    """The float32 with the given IEEE bit pattern (constants are given as bits so that no
    decimal-to-binary conversion can differ between languages)."""
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


# ln(2) split so that e * LN2_HI is exact for |e| <= 24.
LN2_HI = f32(0x3F317200)  # 0.693145751953125
LN2_LO = f32(0x35BFBE8E)  # 1.4286068e-06
SQRT2 = f32(0x3FB504F3)  # 1.4142135
TWO_PI = f32(0x40C90FDB)  # 6.2831855
# 2 * atanh series coefficients: ln(m) = s * (2 + z*(2/3 + z*(2/5 + z*(2/7 + z*2/9)))), s=(m-1)/(m+1), z=s^2
LOG_C = [f32(0x3E638E39), f32(0x3E924925), f32(0x3ECCCCCD), f32(0x3F2AAAAB), f32(0x40000000)]
# sin(x) = x + x^3 * (-1/6 + x^2*(1/120 + x^2*(-1/5040 + x^2/362880)))
SIN_C = [f32(0x3638EF1D), f32(0xB9500D01), f32(0x3C088889), f32(0xBE2AAAAB)]
# cos(x) = 1 + x^2 * (-1/2 + x^2*(1/24 + x^2*(-1/720 + x^2*(1/40320 - x^2/3628800))))
COS_C = [f32(0xB493F27E), f32(0x37D00D01), f32(0xBAB60B61), f32(0x3D2AAAAB), f32(0xBF000000)]


def philox4x32_10(ctr, key):
    """Philox4x32 with 10 rounds over arrays: ctr is (4, n) uint32, key is (2, n) uint32."""
    c0, c1, c2, c3 = (c.astype(np.uint64) for c in ctr)
    k0, k1 = (k.astype(np.uint32) for k in key)
    for r in range(10):
        if r > 0:
            k0 = (k0 + _W0).astype(np.uint32)
            k1 = (k1 + _W1).astype(np.uint32)
        p0 = _M0 * c0
        p1 = _M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0 = hi1 ^ c1 ^ k0.astype(np.uint64)
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1.astype(np.uint64)
        c3 = lo0
    return [c.astype(np.uint32) for c in (c0, c1, c2, c3)]


def uniform(x):
    """(2*(x>>9)+1) * 2^-24: exact odd multiples of 2^-24 in (0, 1)."""
    odd = ((x.astype(np.uint32) >> np.uint32(9)) << np.uint32(1)) | np.uint32(1)
    return odd.astype(np.float32) * f32(0x33800000)  # 2^-24


def _poly(coeffs, z):
    acc = np.full_like(z, coeffs[0])
    for c in coeffs[1:]:
        acc = acc * z + c
    return acc


def ln(u):
    """Natural log of u in (0, 1] in float32 with a fixed sequence of IEEE operations."""
    bits = u.view(np.uint32)
    e = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - 127
    m = ((bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)).view(np.float32)
    big = m > SQRT2
    m = np.where(big, m * f32(0x3F000000), m)  # m * 0.5 is exact
    e = e + big.astype(np.int32)
    s = (m - f32(0x3F800000)) / (m + f32(0x3F800000))
    z = s * s
    log_m = s * _poly(LOG_C, z)
    ef = e.astype(np.float32)
    return ef * LN2_HI + (ef * LN2_LO + log_m)


def sincos_2pi(u):
    """(sin(2 pi u), cos(2 pi u)) for u in (0, 1), reduced exactly to |x| <= pi/4 by quadrant."""
    q = np.floor(u * f32(0x40800000) + f32(0x3F000000)).astype(np.int32)  # nearest quarter turn
    f = u - q.astype(np.float32) * f32(0x3E800000)  # exact, |f| <= 1/8
    x = f * TWO_PI
    x2 = x * x
    s = x + (x * x2) * _poly(SIN_C, x2)
    c = f32(0x3F800000) + x2 * _poly(COS_C, x2)
    quadrant = q & 3
    sin_out = np.select([quadrant == 0, quadrant == 1, quadrant == 2], [s, c, -s], -c)
    cos_out = np.select([quadrant == 0, quadrant == 1, quadrant == 2], [c, -s, -c], s)
    return sin_out.astype(np.float32), cos_out.astype(np.float32)


def normal(seed, stream, shape):
    """A float32 array of standard normal noise of `shape` for (seed, stream)."""
    n = int(np.prod(shape, dtype=np.int64))
    index = np.arange(n, dtype=np.uint64)
    block = index // np.uint64(4)
    lane = (index % np.uint64(4)).astype(np.int64)
    seed, stream = np.uint64(seed), np.uint64(stream)
    ctr = [block & _MASK32, block >> np.uint64(32),
           np.full(n, stream & _MASK32, dtype=np.uint64), np.full(n, stream >> np.uint64(32), dtype=np.uint64)]
    key = [np.full(n, seed & _MASK32, dtype=np.uint64), np.full(n, seed >> np.uint64(32), dtype=np.uint64)]
    r = philox4x32_10(ctr, key)
    pair = lane // 2
    first = np.where(pair == 0, r[0], r[2])
    second = np.where(pair == 0, r[1], r[3])
    u1, u2 = uniform(first), uniform(second)
    radius = np.sqrt(f32(0xC0000000) * ln(u1))  # sqrt(-2 ln u1)
    sin_v, cos_v = sincos_2pi(u2)
    out = np.where(lane % 2 == 0, radius * cos_v, radius * sin_v)
    return out.astype(np.float32).reshape(shape)


def stream_id(draw, adapter, direction):
    """The stream of the noise for one PVL attention (see module docstring)."""
    return (int(draw) << 16) | (int(adapter) << 1) | int(direction)


if __name__ == "__main__":
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    kat = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, want in kat:
        got = philox4x32_10([np.array([c], dtype=np.uint32) for c in ctr], [np.array([k], dtype=np.uint32) for k in key])
        assert [int(g[0]) for g in got] == want, (ctr, key, [hex(int(g[0])) for g in got])
    z = normal(1234, stream_id(0, 3, 1), (1 << 16,))
    u = np.linspace(1e-6, 1, 100001, dtype=np.float32)
    assert np.max(np.abs(ln(u) - np.log(u.astype(np.float64)))) < 2e-7 * 8
    uu = np.linspace(1e-6, 1 - 1e-6, 100001, dtype=np.float32)
    s, c = sincos_2pi(uu)
    assert np.max(np.abs(s - np.sin(2 * np.pi * uu.astype(np.float64)))) < 1e-6
    assert np.max(np.abs(c - np.cos(2 * np.pi * uu.astype(np.float64)))) < 1e-6
    print("philox kat ok; normal mean %.4f std %.4f" % (z.mean(), z.std()))
