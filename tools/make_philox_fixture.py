"""Writes tests/fixtures/philox_normal.safetensors: noise from the NumPy definition of the
generator (tools/reference/philox.py), which tests/philox.rs compares with the Rust CPU and CUDA
implementations bit for bit.

Contents:
  seed_<seed>_stream_<stream>         float32, philox.normal(seed, stream, shape) for a few shapes
                                      (seeds and streams above 2^32, sizes that are not multiples of 4)
  far_seed_<seed>_stream_<stream>_index  uint64, element indices whose Philox block exceeds 2^32
  far_seed_<seed>_stream_<stream>_value  float32, the noise at those indices
  polynomial_checksums                uint64 [3], checksums of the bit patterns of ln(u), sin(2 pi u)
                                      and cos(2 pi u) over all 2^23 values u the generator can draw
                                      (so a one-ulp difference anywhere in the domain is caught;
                                      see polynomial_checksums below)

Run from the repository root:  python tools/make_philox_fixture.py
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference"))
import philox  # noqa: E402

OUT = os.path.join("tests", "fixtures", "philox_normal.safetensors")

# (seed, stream, shape). Element counts cover n % 4 = 0, 1, 2, 3; one shape is 2-D.
CASES = [
    (0, 0, (7, 143)),  # 1001
    (1234, philox.stream_id(0, 3, 1), (4099,)),
    (0xDEADBEEFCAFEF00D, philox.stream_id(70000, 2, 0), (2050,)),  # stream > 2^32
    ((1 << 32) + 5, (1 << 40) + 17, (3000,)),  # seed and stream just above 2^32
    (0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, (1003,)),
]

# Indices far along a sequence: the block index i // 4 reaches the counter's high word.
FAR_SEED, FAR_STREAM = 42, philox.stream_id(3, 5, 1)
FAR_STARTS = [0, (1 << 34) - 4, 1 << 34, (1 << 40) + 2, (1 << 62) + 1, (1 << 64) - 8]


def normal_at(seed, stream, indices):
    """philox.normal evaluated at arbitrary element indices (philox.normal itself only produces
    elements 0..n). Same counter layout and lane choice, built from the reference's own pieces;
    checked against philox.normal below."""
    index = np.asarray(indices, dtype=np.uint64)
    block, lane = index // np.uint64(4), (index % np.uint64(4)).astype(np.int64)
    seed, stream = np.uint64(seed), np.uint64(stream)
    mask = np.uint64(0xFFFFFFFF)
    n = index.size
    ctr = [block & mask, block >> np.uint64(32), np.full(n, stream & mask), np.full(n, stream >> np.uint64(32))]
    key = [np.full(n, seed & mask), np.full(n, seed >> np.uint64(32))]
    r = philox.philox4x32_10(ctr, key)
    first = np.where(lane // 2 == 0, r[0], r[2])
    second = np.where(lane // 2 == 0, r[1], r[3])
    radius = np.sqrt(philox.f32(0xC0000000) * philox.ln(philox.uniform(first)))
    sin_v, cos_v = philox.sincos_2pi(philox.uniform(second))
    return np.where(lane % 2 == 0, radius * cos_v, radius * sin_v).astype(np.float32)


# Odd multiplier of the checksums (the 64-bit golden ratio).
CHECKSUM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def polynomial_checksums():
    """sum_k bits(f(u_k)) * P^(k+1) mod 2^64 for f in (ln, sin 2pi, cos 2pi), where u_k =
    uniform(k << 9) is the k-th smallest uniform value and P is odd: any change of one value
    changes the sum, and unlike position-free sums it tells sin from cos (which take the same
    values, shifted by a quarter turn)."""
    u = philox.uniform(np.arange(1 << 23, dtype=np.uint32) << np.uint32(9))
    powers = np.cumprod(np.full(1 << 23, CHECKSUM_MULTIPLIER, dtype=np.uint64), dtype=np.uint64)  # wraps mod 2^64
    sin_v, cos_v = philox.sincos_2pi(u)
    return np.array([np.sum(v.view(np.uint32).astype(np.uint64) * powers, dtype=np.uint64)
                     for v in (philox.ln(u), sin_v, cos_v)], dtype=np.uint64)


def main():
    tensors, cases = {}, []
    for seed, stream, shape in CASES:
        name = f"seed_{seed}_stream_{stream}"
        tensors[name] = np.ascontiguousarray(philox.normal(seed, stream, shape), dtype=np.float32)
        cases.append({"name": name, "seed": str(seed), "stream": str(stream), "shape": list(shape)})

    check = normal_at(CASES[1][0], CASES[1][1], np.arange(64))
    assert np.array_equal(check.view(np.uint32), tensors[cases[1]["name"]][:64].view(np.uint32))

    far_index = np.array([start + k for start in FAR_STARTS for k in range(8)], dtype=np.uint64)
    far_name = f"far_seed_{FAR_SEED}_stream_{FAR_STREAM}"
    tensors[far_name + "_index"] = far_index
    tensors[far_name + "_value"] = normal_at(FAR_SEED, FAR_STREAM, far_index)

    tensors["polynomial_checksums"] = polynomial_checksums()

    # One metadata key: safetensors writes several in hash order, which would make the file
    # differ byte-wise between two runs of this script.
    description = {
        "generator": "tools/reference/philox.py (Philox4x32-10 + Box-Muller, f32 polynomials)",
        "written_by": "tools/make_philox_fixture.py",
        "cases": cases,
        "far": {"name": far_name, "seed": str(FAR_SEED), "stream": str(FAR_STREAM)},
    }
    metadata = {"description": json.dumps(description, sort_keys=True)}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes): " + ", ".join(f"{k} {v.shape}" for k, v in tensors.items()))


if __name__ == "__main__":
    main()
