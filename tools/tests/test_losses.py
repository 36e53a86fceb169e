"""Checks of tools/reference/losses.py against cases worked by hand and naive loops, and that the
committed training fixture equals a regeneration.

    python tools/tests/test_losses.py -v
With MONAI installed, the row-wise Dice is also compared with monai.losses.DiceLoss itself.
"""

import importlib.util
import math
import os
import sys
import unittest

import torch

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

from reference import losses  # noqa: E402

S = losses.DICE_SMOOTH
LN3 = math.log(3.0)  # sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4


def monai_channel_dice(p, y):
    """MONAI's per-channel expression (docs/model.md §10.1): 1 - (2 tp + s) / (2 (tp + fp/2 + fn/2) + s)."""
    tp = sum(pi * yi for pi, yi in zip(p, y))
    fp = sum(pi * (1 - yi) for pi, yi in zip(p, y))
    fn = sum((1 - pi) * yi for pi, yi in zip(p, y))
    return 1 - (2 * tp + S) / (2 * (tp + fp / 2 + fn / 2) + S)


class DiceTests(unittest.TestCase):
    # One image, H = 3, W = 2. Row 0 (dropped by include_background=False) is all foreground with
    # confident logits, so keeping it would change the value.
    logits = torch.tensor([[[LN3, LN3], [LN3, -LN3], [0.0, LN3]]], dtype=torch.float64)
    masks = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)

    def test_rows_equals_monai_formula_by_hand(self):
        # Row 1: p = [3/4, 1/4], y = [1, 0]: tp = 3/4, fp = 1/4, fn = 1/4 -> 1 - (3/2 + s) / (2 + s).
        # Row 2: p = [1/2, 3/4], y = [1, 1]: tp = 5/4, fp = 0, fn = 3/4 -> 1 - (5/2 + s) / (13/4 + s).
        row1 = 1 - (1.5 + S) / (2.0 + S)
        row2 = 1 - (2.5 + S) / (3.25 + S)
        self.assertAlmostEqual(row1, monai_channel_dice([0.75, 0.25], [1, 0]), places=15)
        self.assertAlmostEqual(row2, monai_channel_dice([0.5, 0.75], [1, 1]), places=15)
        got = losses.dice_rows(self.logits, self.masks).item()
        self.assertAlmostEqual(got, (row1 + row2) / 2, places=12)

    def test_image_mode_by_hand(self):
        # All six pixels: tp = 3/4 + 3/4 + 3/4 + 1/2 + 3/4 = 7/2, sum p = 7/2 + 1/4 = 15/4, sum y = 5.
        want = 1 - (7.0 + S) / (15 / 4 + 5 + S)
        self.assertAlmostEqual(losses.dice_image(self.logits, self.masks).item(), want, places=12)

    def test_rows_equals_monai_formula_on_a_random_case(self):
        gen = torch.Generator().manual_seed(3)
        logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64) * 2
        masks = (torch.rand(2, 5, 7, generator=gen) < 0.4).double()
        p = torch.sigmoid(logits)
        terms = [monai_channel_dice(p[b, r].tolist(), masks[b, r].tolist()) for b in range(2) for r in range(1, 5)]
        self.assertAlmostEqual(losses.dice_rows(logits, masks).item(), sum(terms) / len(terms), places=12)

    def test_rows_needs_two_rows(self):
        with self.assertRaises(ValueError):
            losses.dice_rows(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))

    @unittest.skipUnless(importlib.util.find_spec("monai"), "MONAI is not installed")
    def test_rows_equals_monai_dice_loss(self):
        from monai.losses import DiceLoss
        gen = torch.Generator().manual_seed(4)
        logits = torch.randn(3, 9, 11, generator=gen)
        masks = (torch.rand(3, 9, 11, generator=gen) < 0.3).float()
        official = DiceLoss(include_background=False, sigmoid=True, reduction="mean")(logits, masks)
        self.assertAlmostEqual(losses.dice_rows(logits, masks).item(), official.item(), places=6)


class BceTests(unittest.TestCase):
    def test_bce_equals_the_probability_form(self):
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64) * 3
        y = torch.rand(2, 4, 6, generator=gen, dtype=torch.float64)
        p = torch.sigmoid(x)
        want = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
        self.assertAlmostEqual(losses.bce_with_logits(x, y).item(), want.item(), places=12)


def softcon_loops(z, t, tau):
    """docs/model.md §4.2 with explicit loops over the batch (float64 lists)."""
    b = len(t)
    pooled = []
    for image in z:
        units = [[v / math.sqrt(sum(u * u for u in token)) for v in token] for token in image]
        pooled.append([sum(col) / len(units) for col in zip(*units)])

    def dot(a, c):
        return sum(x * y for x, y in zip(a, c))

    sim = [[dot(t[i], t[j]) / tau for j in range(b)] for i in range(b)]
    targets = []
    for row in sim:
        norm = math.sqrt(sum(v * v for v in row))
        e = [math.exp(v / norm) for v in row]
        targets.append([v / sum(e) for v in e])
    img = [[dot(pooled[i], t[j]) / tau for j in range(b)] for i in range(b)]
    txt = [[img[j][i] for j in range(b)] for i in range(b)]

    def soft_ce(logits, y):
        total = 0.0
        for row, yr in zip(logits, y):
            lse = math.log(sum(math.exp(v) for v in row))
            total -= sum(yv * (v - lse) for v, yv in zip(row, yr))
        return total / len(logits)

    targets_t = [[targets[j][i] for j in range(b)] for i in range(b)]
    return (soft_ce(img, targets) + soft_ce(txt, targets_t)) / 2


class SoftConTests(unittest.TestCase):
    def test_matches_loops(self):
        gen = torch.Generator().manual_seed(6)
        z = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
        t = torch.randn(3, 5, generator=gen, dtype=torch.float64)
        want = softcon_loops(z.tolist(), t.tolist(), 0.2)
        self.assertAlmostEqual(losses.soft_contrastive(z, t, 0.2).item(), want, places=10)

    def test_targets_carry_no_gradient(self):
        gen = torch.Generator().manual_seed(7)
        z = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
        t = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        losses.soft_contrastive(z, t, 0.2).backward()
        # Same loss with the targets passed in as constants: identical text gradient.
        y = losses.soft_targets(t.detach(), 0.2)
        t2 = t.detach().clone().requires_grad_(True)
        pooled = (z / z.norm(dim=-1, keepdim=True)).mean(dim=1)
        fixed = (losses.soft_cross_entropy(pooled @ t2.t() / 0.2, y)
                 + losses.soft_cross_entropy(t2 @ pooled.t() / 0.2, y.t())) / 2
        fixed.backward()
        self.assertTrue(torch.allclose(t.grad, t2.grad, rtol=0, atol=1e-14))

    def test_batch_of_one_is_zero(self):
        z = torch.randn(1, 3, 4)
        t = torch.randn(1, 4)
        self.assertEqual(losses.soft_contrastive(z, t, 0.2).item(), 0.0)


class TrainFixtureTests(unittest.TestCase):
    def test_committed_train_fixture_is_current(self):
        import make_train_fixtures
        from reference.model import Config
        from tokenizers import Tokenizer
        torch.use_deterministic_algorithms(True)
        cfg = Config.from_json(make_train_fixtures.make_fixtures.CONFIG_PATH)
        tokenizer = Tokenizer.from_file(make_train_fixtures.make_fixtures.TOKENIZER_PATH)
        blob = make_train_fixtures.serialise(cfg, tokenizer)
        with open(os.path.join(ROOT, "tests", "fixtures", make_train_fixtures.OUT_NAME), "rb") as f:
            self.assertTrue(f.read() == blob, "tiny_train.safetensors differs: run tools/make_train_fixtures.py")

    def test_losses_fall_and_masks_have_foreground(self):
        from safetensors.torch import load_file
        st = load_file(os.path.join(ROOT, "tests", "fixtures", "tiny_train.safetensors"))
        self.assertLess(st["loss.step3"].item(), st["loss.step0"].item())
        self.assertEqual(st["loss.step0"].item(), st["loss.total"].item())
        for image in st["input.masks"]:
            self.assertGreater(image.sum().item(), 0)
            self.assertTrue(((image == 0) | (image == 1)).all())


if __name__ == "__main__":
    unittest.main()
