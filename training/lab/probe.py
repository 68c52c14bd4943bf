"""How an exported model's scores move when the same figures are rendered as another scanner might render them.

A model that never saw a scanner can find all its figures more atypical (or less): its balanced accuracy falls
at any threshold fixed in advance even where its ranking (AUC) holds. ``probe`` asks which difference of rendering
could be the cause. It serves a dataset's figures through the container's inference path, as ``predict`` does,
once as scanned and once per rendering: JPEG compression, sensor noise, a tone curve, one stain stronger,
defocus, and a pixel size recorded 8% too small or too large (so the figure is resampled to a wrong scale). For
each it reports what ``evaluate`` does, at the manifest's threshold: each class's mean P(atypical), sensitivity,
specificity, balanced accuracy, AUC. A rendering that moves the class means the way the unseen scanner's shift
did is a candidate cause; if none does, the shift is not of these kinds (what the figures show, for one, can
differ between scanners' cases).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from contracts import classify
from process import OnnxEnsemble
from training.augment import rescale_stains
from training.evaluate import domain_scores
from training.lab.describe import JPEG_BLOCK
from training.predict import figures_to_score

log = logging.getLogger(__name__)


def as_jpeg(quality: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Re-encode a uint8 [H, W, 3] figure as JPEG at ``quality``, the 8-px grid at a random offset."""

    def render(page: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        dy, dx = rng.integers(0, JPEG_BLOCK, size=2)
        padded = np.pad(page, ((dy, JPEG_BLOCK), (dx, JPEG_BLOCK), (0, 0)), mode="reflect")
        buffer = io.BytesIO()
        Image.fromarray(padded).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer).convert("RGB"))
        return decoded[dy : dy + page.shape[0], dx : dx + page.shape[1]]

    return render


def with_noise(sd: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Add Gaussian noise of ``sd`` grey levels to every pixel and channel (a noisier sensor)."""

    def render(page: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.clip(page + rng.normal(0.0, sd, page.shape), 0, 255).round().astype(np.uint8)

    return render


def with_gamma(gamma: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Map every value v to 255 (v / 255) ** gamma: another tone curve, black and white kept."""
    table = np.round(255 * (np.arange(256) / 255) ** gamma).astype(np.uint8)
    return lambda page, rng: table[page]


def stained(stain: int, factor: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Scale one stain's optical density by ``factor`` (0 hematoxylin, 1 eosin), by the colour deconvolution of
    training's stain jitter: a lab's staining, or a scanner's colour response, stronger in one stain."""
    alpha = torch.ones(3, dtype=torch.float64)
    alpha[stain] = factor

    def render(page: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rescale_stains(torch.from_numpy(page.astype(np.float64)), alpha).numpy().round().astype(np.uint8)

    return render


def defocused(radius: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Gaussian blur of ``radius`` px (a softer lens or focus)."""
    return lambda page, rng: np.asarray(Image.fromarray(page).filter(ImageFilter.GaussianBlur(radius)))


@dataclass(frozen=True)
class Rendering:
    name: str
    render: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None  # None: the pixels as scanned
    pixel_size_factor: float = 1.0  # the pixel size the figure is served with, as a multiple of its scanner's


RENDERINGS = (
    Rendering("as scanned"),
    Rendering("JPEG quality 75", as_jpeg(75)),
    Rendering("JPEG quality 50", as_jpeg(50)),
    Rendering("noise sd 4", with_noise(4.0)),
    Rendering("gamma 0.8", with_gamma(0.8)),
    Rendering("gamma 1.25", with_gamma(1.25)),
    Rendering("hematoxylin x1.2", stained(0, 1.2)),
    Rendering("eosin x1.2", stained(1, 1.2)),
    Rendering("defocus 0.7 px", defocused(0.7)),
    Rendering("pixel size -8%", pixel_size_factor=0.92),
    Rendering("pixel size +8%", pixel_size_factor=1.08),
)


def probe(
    model_dir: Path, data_root: Path, scanners: list[str] | None = None, device: str = "cpu", seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per rendering (``RENDERINGS``, in order): ``evaluate``'s figures (each class's mean probability among them)
    at the manifest's threshold. Every rendering draws from its own generator seeded with ``seed``: reruns agree.
    A figure whose scanner has no known pixel size is served as it is: the pixel-size renderings leave it be."""
    figures, pixels, sizes, _ = figures_to_score(data_root, scanners)
    labels = np.array([f.label for f in figures])
    ensemble = OnnxEnsemble(model_dir, device)
    results = {}
    for rendering in RENDERINGS:
        rng = np.random.default_rng(seed)
        pages = [rendering.render(p, rng) for p in pixels] if rendering.render else list(pixels)
        served_sizes = [None if s is None else s * rendering.pixel_size_factor for s in sizes]
        probs = ensemble.predict(pages, pixel_sizes_um=served_sizes)
        preds = classify(probs, ensemble.manifest.threshold).astype(int)
        results[rendering.name] = row = domain_scores(labels, preds, probs)
        log.info(
            "%s: mean P normal %.3f, atypical %.3f; BA %.3f",
            rendering.name,
            row["mean_prob_normal"],
            row["mean_prob_atypical"],
            row["balanced_accuracy"],
        )
    return results
