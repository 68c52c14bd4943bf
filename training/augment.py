"""The training-time transforms, apart from the loop: each takes a batch of figures [N, H, W, 3] (uint8, or float
in [0, 255]) and a ``torch.Generator``, and returns float [N, H, W, 3] in [0, 255]. ``augment_batch`` applies
those a config asks for, in a fixed order, so the same seed gives the same batches (and a resumed run the same
ones as an uninterrupted run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.preprocess import binomial_blur

# Ruifrok & Johnston's stain vectors (rows: hematoxylin, eosin, DAB) for H&E colour deconvolution
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
LUMA_601 = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights of R, G, B


def augment_batch(batch: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """D4, stain, colour, gray, shift/zoom, sharpness: each where ``cfg`` turns it on."""
    if cfg.augment:
        batch = augment_d4(batch, generator)
    if cfg.stain_jitter:
        batch = augment_stain(batch, cfg.stain_jitter, generator)
    if cfg.color_jitter:
        batch = augment_color(batch, cfg.color_jitter, generator)
    if cfg.grayscale:
        batch = augment_grayscale(batch, cfg.grayscale, generator)
    if cfg.shift_scale:
        batch = augment_shift_zoom(batch, cfg.shift_scale, generator)
    if cfg.sharpness_jitter:
        batch = augment_sharpness(batch, cfg.sharpness_jitter, generator)
    return batch


def augment_d4(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns: a mitotic figure has no canonical orientation. Dtype kept."""
    out = []
    for img, (flip, turns) in zip(batch, torch.randint(0, 4, (len(batch), 2), generator=generator), strict=True):
        img = torch.rot90(img, int(turns), dims=(0, 1))
        out.append(img.flip(1) if flip % 2 else img)
    return torch.stack(out)


def rescale_stains(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Colour deconvolution and back: each stain's optical density (hematoxylin, eosin, DAB) times ``alpha`` plus
    ``beta``, both broadcast against [..., 3]. Float [..., H, W, 3] in [0, 255] in, the same dtype out, clamped to
    [0, 255]."""
    od = -torch.log((x + 1) / 256)
    od = ((od @ HED_FROM_RGB.to(x.dtype)) * alpha + beta) @ RGB_FROM_HED.to(x.dtype)
    return (256 * torch.exp(-od) - 1).clamp(0, 255)


def augment_stain(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """HED jitter: each stain's optical density scaled and shifted by up to ``strength`` per image."""
    n = len(batch)
    alpha = 1 + (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * strength
    beta = (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * strength
    return rescale_stains(batch.float(), alpha, beta)


def augment_color(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation, each scaled per image by a factor in [1 - strength, 1 + strength]."""
    x = batch.float()
    n = len(x)
    brightness, contrast, saturation = 1 + (torch.rand(3, n, 1, 1, 1, generator=generator) * 2 - 1) * strength
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x @ LUMA_601
    x = gray[..., None] + (x - gray[..., None]) * saturation
    return x.clamp(0, 255)


def augment_grayscale(batch: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """Each image turned to its luminance (``LUMA_601``) in all three channels with probability ``share``: a
    lab's hue differs, a figure's chromatin shape does not."""
    x = batch.float()
    gray = (x @ LUMA_601)[..., None].expand_as(x)
    chosen = (torch.rand(len(x), generator=generator) < share)[:, None, None, None]
    return torch.where(chosen, gray, x)


def augment_shift_zoom(batch: torch.Tensor, shift_scale: float, generator: torch.Generator) -> torch.Tensor:
    """A random shift and zoom of up to ``shift_scale`` of the patch (a figure is not always centred); borders
    are reflected, not black."""
    x = batch.float().permute(0, 3, 1, 2)
    n = len(x)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * shift_scale
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift_scale * 2  # grid units span [-1, 1]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return x.permute(0, 2, 3, 1).clamp(0, 255)


def augment_sharpness(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """``x + k (x - blur(x))`` with ``k`` uniform in [-strength, strength] per image: k < 0 blurs (k = -1 is the
    binomial blur itself), k > 0 sharpens (unsharp masking). Scanners differ most in sharpness."""
    x = batch.float().permute(0, 3, 1, 2)
    k = (torch.rand(len(x), 1, 1, 1, generator=generator) * 2 - 1) * strength
    x = x + k * (x - binomial_blur(x))
    return x.permute(0, 2, 3, 1).clamp(0, 255)
