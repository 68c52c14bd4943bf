"""How a dataset's domains differ, per scanner, so augmentation and the model's input can cover it
(``python -m training describe``; the breast subset's figures: docs/results.md)."""

from __future__ import annotations

import numpy as np
import torch

from training.figure import Figure
from training.preprocess import binomial_blur, detail_rms, equalize_detail, standardize_channels

JPEG_BLOCK = 8  # JPEG compresses 8x8-pixel blocks: a scanner that stores tiles as JPEG leaves this grid
MID_BAND_BLURS = 6  # the mid band's lower edge: 6 more binomial blurs, a Gaussian of sigma ~2.4 px


def jpeg_grid(gray: np.ndarray) -> np.ndarray:
    """float [N, H, W] -> [N]: how much stronger the differences between neighbouring pixels are on the strongest
    of the 8 pixel phases than on the median one, across and down, averaged. A crop-out lies on the grid at any
    offset, so the phase is found, not assumed; hence even a figure without a JPEG block grid scores a little above
    1 (its strongest phase beats the median by chance)."""
    ratios = []
    for axis in (1, 2):
        per_boundary = np.abs(np.diff(gray, axis=axis)).mean(axis=3 - axis)  # [N, boundaries]
        phases = np.stack([per_boundary[:, p::JPEG_BLOCK].mean(axis=1) for p in range(JPEG_BLOCK)], axis=1)
        ratios.append(phases.max(axis=1) / np.median(phases, axis=1))
    return (ratios[0] + ratios[1]) / 2


def mid_band_rms(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] -> [N]: the RMS of the band below the detail band, the blurred image minus its further
    ``MID_BAND_BLURS`` blurs (structure of ~1-3 px: chromatin texture, the edges of a figure's arms)."""
    smooth = coarse = binomial_blur(x)
    for _ in range(MID_BAND_BLURS):
        coarse = binomial_blur(coarse)
    return (smooth - coarse).square().mean(dim=(1, 2, 3)).sqrt()


def describe_domains(figures: list[Figure], pixels: np.ndarray) -> dict[str, dict[str, float]]:
    """Per scanner: figures, atypical share, mean RGB, sharpness (the mean absolute difference between
    neighbouring pixels of the gray image, across and down), the detail band's RMS after channel standardization
    (what ``standardize: channels+detail`` equalizes), the mid band's RMS once the detail band is equalized too,
    and the strength of a JPEG block grid (:func:`jpeg_grid`)."""
    gray = pixels.astype(np.float32).mean(axis=-1)
    sharpness = np.abs(np.diff(gray, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(gray, axis=2)).mean(axis=(1, 2))
    grid = jpeg_grid(gray)
    detail, mid = [], []
    with torch.no_grad():
        for chunk in np.array_split(pixels, max(1, len(pixels) // 256)):
            x = standardize_channels(torch.from_numpy(chunk).permute(0, 3, 1, 2).float())
            detail.append(detail_rms(x).numpy())
            mid.append(mid_band_rms(equalize_detail(x)).numpy())
    detail, mid = np.concatenate(detail), np.concatenate(mid)
    scanners = np.array([f.scanner for f in figures])
    labels = np.array([f.label for f in figures])
    result = {}
    for scanner in sorted(set(scanners)):
        m = scanners == scanner
        red, green, blue = (float(c) for c in pixels[m].reshape(-1, 3).mean(axis=0))
        result[scanner] = {
            "figures": int(m.sum()),
            "atypical_share": float(labels[m].mean()),
            **{"red": red, "green": green, "blue": blue},
            "sharpness": float(sharpness[m].mean()),
            "detail_rms": float(detail[m].mean()),
            "mid_band_rms": float(mid[m].mean()),
            "jpeg_grid": float(grid[m].mean()),
        }
    return result


def table(domains: dict[str, dict[str, float]]) -> str:
    lines = [f"{'scanner':24}" + "".join(f"{k:>15}" for k in next(iter(domains.values())))]
    for scanner, figs in domains.items():
        cells = (f"{v:>15.3f}" if isinstance(v, float) else f"{v:>15d}" for v in figs.values())
        lines.append(f"{scanner[:24]:24}" + "".join(cells))
    return "\n".join(lines)
