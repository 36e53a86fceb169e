"""The two torch-side pieces `bench_reference.py` adds to the reference compute the reference's
maths: the engine-order batched prediction equals `MedCLIPSeg.predict` given the same per-draw
noise, and the unfused attention equals `ProbCrossAttention`'s internals.

    python -m unittest tools.tests.test_bench_reference   (or discover -s tools/tests)
"""

import os
import sys
import unittest

import torch

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOOLS)

import bench_reference  # noqa: E402
from reference import model as ref  # noqa: E402
from test_model import tiny_model  # noqa: E402


class BenchReferenceTests(unittest.TestCase):
    def test_cnn_ops_eca_equals_the_reference_module(self):
        from reference.cnn_branch import Eca
        torch.manual_seed(5)
        module = Eca(1240)
        x = torch.randn(2, 1240, 3, 5)
        with torch.no_grad():
            self.assertTrue(torch.allclose(bench_reference.eca(x, module.conv.weight), module(x), atol=1e-6))


    def test_batched_predict_equals_the_official_loop_with_the_same_noise(self):
        model = tiny_model(3)
        cfg = model.cfg
        torch.manual_seed(4)
        pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
        ids = bench_reference.prompt_ids(cfg, 2)
        seed, samples = 7, 3

        def stacked_noise(k, direction, shape):
            # Draw s of the loop fills rows s*B .. s*B + B - 1 of the stacked batch.
            per_draw = (shape[0] // samples, *shape[1:])
            return torch.cat([ref.adapter_noise(seed, s, k, direction, per_draw) for s in range(samples)])

        with torch.no_grad():
            loop = model.predict(pixels, ids, seed, samples)
            batched = bench_reference.batched_predict(model, pixels, ids, samples, stacked_noise)
        for a, b in zip(loop, batched):
            self.assertEqual(a.shape, b.shape)
            # Same operations on other batch shapes: only the GEMM blocking differs.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def test_unfused_attention_is_the_reference_attention(self):
        torch.manual_seed(5)
        attention = ref.ProbCrossAttention(16, 2.35, 0.0, 1e-5)
        query, context, noise = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
        record = {}
        with torch.no_grad():
            attention(query, context, noise, record)
            out = bench_reference.prob_attention(record["q"], record["k_mu"], record["k_var"], record["v_mu"],
                                                 record["v_var"], 2.35, noise)
        torch.testing.assert_close(out, record["out"], rtol=0, atol=0)


if __name__ == "__main__":
    unittest.main()
