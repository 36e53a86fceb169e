"""The training losses of MedCLIPSeg in plain PyTorch (docs/model.md §4), quirks included.

  * bce_with_logits: BCEWithLogitsLoss() on [B, H, W] logits, mean over all pixels;
  * dice_rows: what the official monai.losses.DiceLoss(include_background=False, sigmoid=True,
    reduction="mean") computes on [B, H, W] tensors: MONAI reads dim 1 (the image rows) as the
    channel axis, drops "channel" 0 (row 0) and takes one soft Dice per remaining (image, row)
    over the W pixels of that row (docs/model.md §4.1, §10.1);
  * dice_image: the per-image soft Dice over all H*W pixels (the paper's presumable intent);
  * soft_contrastive: L_SoftCon (docs/model.md §4.2) on the projected patch tokens (CLS removed) and the raw,
    unnormalised text embedding, soft targets computed without gradient;
  * total: DICE_WEIGHT * dice_rows + CE_WEIGHT * bce + CLIP_WEIGHT * soft_contrastive.

Mirrored by src/ops/loss.rs and src/ops/softcon.rs in the engine.
"""

import torch
import torch.nn.functional as F

# MONAI DiceLoss defaults smooth_nr = smooth_dr = 1e-5.
DICE_SMOOTH = 1e-5
# Loss weights and temperature of the official configs (docs/model.md §4).
DICE_WEIGHT = 0.5
CE_WEIGHT = 0.5
CLIP_WEIGHT = 0.1
TEMPERATURE = 0.2


def bce_with_logits(logits, target):
    """Mean over all elements of max(x, 0) - x*y + log1p(exp(-|x|))."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def _soft_dice(p, y, dims):
    """1 - (2 sum(p*y) + s) / (sum(p) + sum(y) + s) over `dims`, MONAI's arithmetic."""
    intersection = (p * y).sum(dim=dims)
    denominator = y.sum(dim=dims) + p.sum(dim=dims)
    return 1.0 - (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)


def dice_rows(logits, target):
    """The official row-wise soft Dice on [B, H, W]: rows 1..H-1 of every image, mean over B*(H-1)."""
    if logits.dim() != 3 or logits.shape[1] < 2:
        raise ValueError(f"dice_rows needs [B, H, W] with H >= 2, got {list(logits.shape)}")
    p = torch.sigmoid(logits)[:, 1:, :]
    y = target.to(logits.dtype)[:, 1:, :]
    return _soft_dice(p, y, dims=(2,)).mean()


def dice_image(logits, target):
    """Per-image soft Dice over all H*W pixels, mean over B."""
    if logits.dim() != 3:
        raise ValueError(f"dice_image needs [B, H, W], got {list(logits.shape)}")
    return _soft_dice(torch.sigmoid(logits), target.to(logits.dtype), dims=(1, 2)).mean()


def soft_cross_entropy(logits, targets):
    """-(1/B) sum_ij targets_ij log softmax_row(logits)_ij."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def soft_targets(text, temperature=TEMPERATURE):
    """Y = softmax_row(S / ||S||_row) with S = t t^T / tau, without gradient."""
    with torch.no_grad():
        sim = text @ text.t() / temperature
        sim = sim / sim.norm(dim=-1, keepdim=True)
        return torch.softmax(sim, dim=-1)


def soft_contrastive(patch_tokens, text, temperature=TEMPERATURE):
    """L_SoftCon of patch tokens [B, N, E] (CLS removed, not normalised) and text [B, E] (raw)."""
    patches = patch_tokens / patch_tokens.norm(dim=-1, keepdim=True)
    pooled = patches.mean(dim=1)  # NOT re-normalised
    logits_per_image = pooled @ text.t() / temperature
    logits_per_text = text @ pooled.t() / temperature
    y = soft_targets(text, temperature)
    return (soft_cross_entropy(logits_per_image, y) + soft_cross_entropy(logits_per_text, y.t())) / 2


def all_terms(logits, masks, patch_tokens, text, temperature=TEMPERATURE):
    """Every loss term (dict of scalars) and the training total (Dice in the official row-wise mode)."""
    terms = {
        "bce": bce_with_logits(logits, masks),
        "dice_rows": dice_rows(logits, masks),
        "dice_image": dice_image(logits, masks),
        "softcon": soft_contrastive(patch_tokens, text, temperature),
    }
    terms["total"] = DICE_WEIGHT * terms["dice_rows"] + CE_WEIGHT * terms["bce"] + CLIP_WEIGHT * terms["softcon"]
    return terms
