"""Deterministic synthetic mitotic figures in the MIDOG25 layout: the embedded default for the demo and tests.

Each 128x128 patch shows H&E-like stroma and interphase nuclei around a dark chromatin figure in the centre:
- normal: one compact metaphase plate, or two parallel anaphase plates;
- atypical: a multipolar (3-4 armed) figure, a plate with lagging fragments, or scattered chromatin clumps.
Slides carry a stain tint and scanners a colour cast and blur, so a slide-grouped split is a real domain test.
Same seed, same bytes: every figure draws from its own generator seeded by (seed, index).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from contracts import INPUT_INTERFACE
from training.data import MIDOG25_COLUMNS, MIDOG25_CSV, PATCH_SIZE

log = logging.getLogger(__name__)

# (name as written in the CSV, RGB multiplier, blur radius): the real CSV's misspelling is kept on purpose.
SCANNERS = (
    ("Hammamatsu XR", (1.00, 0.94, 1.02), 0.6),
    ("Hamamatsu S360", (0.97, 1.00, 0.98), 0.3),
    ("Aperio CS2", (1.03, 0.95, 0.93), 0.9),
)
_YY, _XX = np.mgrid[0:PATCH_SIZE, 0:PATCH_SIZE].astype(np.float32)


def _blobs(centres: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sum of isotropic Gaussians, [128, 128], peak ~1 per blob."""
    out = np.zeros((PATCH_SIZE, PATCH_SIZE), np.float32)
    for (y, x), s in zip(centres, sigmas, strict=True):
        out += np.exp(-((_YY - y) ** 2 + (_XX - x) ** 2) / (2 * s * s))
    return out


def _segment(rng: np.random.Generator, centre, angle: float, length: float, n: int, jitter: float) -> np.ndarray:
    t = np.linspace(-0.5, 0.5, n) * length
    d = np.array([np.sin(angle), np.cos(angle)])
    perp = np.array([np.cos(angle), -np.sin(angle)])
    pts = np.asarray(centre) + t[:, None] * d + rng.normal(0, jitter, (n, 1)) * perp
    return pts


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((PATCH_SIZE, PATCH_SIZE), Image.BICUBIC), np.float32) / 255.0


def _chromatin(rng: np.random.Generator, atypical: bool) -> np.ndarray:
    """Centre figure mask in [0, 1]."""
    c = np.array([64.0, 64.0]) + rng.normal(0, 3, 2)
    angle = rng.uniform(0, np.pi)
    if not atypical:
        if rng.random() < 0.65:
            pts = _segment(rng, c, angle, rng.uniform(18, 30), 14, 1.2)  # metaphase plate
        else:  # anaphase: two parallel plates
            gap = rng.uniform(12, 18) / 2
            off = gap * np.array([np.cos(angle), -np.sin(angle)])
            length = rng.uniform(14, 22)
            pts = np.vstack([_segment(rng, c + s * off, angle, length, 9, 1.0) for s in (1, -1)])
        sig = rng.uniform(2.2, 3.0, len(pts))
    else:
        kind = rng.choice(["multipolar", "lagging", "scattered"])
        if kind == "multipolar":
            arms = int(rng.integers(3, 5))
            angles = angle + np.arange(arms) * 2 * np.pi / arms + rng.normal(0, 0.25, arms)
            length = rng.uniform(10, 16)
            pts = np.vstack(
                [_segment(rng, c + length / 2 * np.array([np.sin(a), np.cos(a)]), a, length, 7, 0.8) for a in angles]
            )
        elif kind == "lagging":
            plate = _segment(rng, c, angle, rng.uniform(18, 26), 12, 1.2)
            n_lag = int(rng.integers(2, 5))
            perp = np.array([np.cos(angle), -np.sin(angle)])
            along = np.array([np.sin(angle), np.cos(angle)])
            lag = c + rng.choice([-1, 1], (n_lag, 1)) * rng.uniform(9, 17, (n_lag, 1)) * perp
            lag += rng.uniform(-8, 8, (n_lag, 1)) * along
            pts = np.vstack([plate, lag])
        else:
            n = int(rng.integers(8, 14))
            r = rng.uniform(6, 20, n)
            a = rng.uniform(0, 2 * np.pi, n)
            pts = c + np.stack([r * np.sin(a), r * np.cos(a)], axis=1)
        sig = rng.uniform(1.8, 3.0, len(pts))
    return np.clip(_blobs(pts, sig) * 0.9, 0, 1)


def render_figure(rng: np.random.Generator, atypical: bool, slide_tint: np.ndarray, scanner: int) -> np.ndarray:
    """One uint8 [128, 128, 3] patch."""
    eosin = np.array([228, 168, 214], np.float32) * slide_tint
    img = eosin * (0.88 + 0.2 * _smooth_noise(rng, 6))[..., None]
    # interphase nuclei: pale, textured, away from the centre
    nuc_mask = np.zeros((PATCH_SIZE, PATCH_SIZE), np.float32)
    for _ in range(int(rng.integers(3, 8))):
        while True:
            y, x = rng.uniform(0, PATCH_SIZE, 2)
            if (y - 64) ** 2 + (x - 64) ** 2 > 30**2:
                break
        ry, rx = rng.uniform(7, 13, 2)
        nuc_mask = np.maximum(nuc_mask, (((_YY - y) / ry) ** 2 + ((_XX - x) / rx) ** 2 <= 1).astype(np.float32))
    nuc_mask *= 0.55 + 0.35 * _smooth_noise(rng, 24)
    hematoxylin_pale = np.array([150, 112, 190], np.float32) * slide_tint
    img = img * (1 - nuc_mask[..., None]) + hematoxylin_pale * nuc_mask[..., None]
    # the mitotic figure, with a faint clear halo of cytoplasm around it
    chrom = _chromatin(rng, atypical)
    halo = np.clip(_blobs(np.array([[64.0, 64.0]]), np.array([16.0])) * 0.25, 0, 1)
    img = img * (1 - halo[..., None]) + np.array([235, 200, 232], np.float32) * halo[..., None]
    hematoxylin_dark = np.array([62, 32, 112], np.float32) * slide_tint
    img = img * (1 - chrom[..., None]) + hematoxylin_dark * chrom[..., None]
    _, cast, blur = SCANNERS[scanner]
    img = img * np.array(cast, np.float32) + rng.normal(0, 4, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(out.filter(ImageFilter.GaussianBlur(blur)))


def synthetic_figures(n: int, seed: int, n_slides: int, atypical_fraction: float = 0.25) -> tuple[np.ndarray, list]:
    """Pixels [n, 128, 128, 3] and per-figure (label, slide, scanner) tuples."""
    slide_rng = np.random.default_rng([seed, 1 << 20])
    tints = 1 + slide_rng.normal(0, 0.04, (n_slides, 3))
    pixels = np.empty((n, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    meta = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        slide = int(rng.integers(n_slides))
        scanner = slide % len(SCANNERS)
        label = int(rng.random() < atypical_fraction)
        pixels[i] = render_figure(rng, bool(label), tints[slide], scanner)
        meta.append((label, slide, scanner))
    return pixels, meta


def write_midog25(root: Path, n: int = 600, seed: int = 0, n_slides: int = 30) -> None:
    """A dataset folder in the official MIDOG25 layout (CSV + images/)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    pixels, meta = synthetic_figures(n, seed, n_slides)
    votes_rng = np.random.default_rng([seed, 1 << 21])
    with (root / MIDOG25_CSV).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MIDOG25_COLUMNS)
        for i, (label, slide, scanner) in enumerate(meta):
            image_id = f"{i}.png"
            Image.fromarray(pixels[i]).save(root / "images" / image_id)
            majority = "AMF" if label else "NMF"
            other = "NMF" if label else "AMF"
            # a third expert is only asked where the first two disagree, as in the real CSV
            e2 = other if votes_rng.random() < 0.1 else majority
            e3 = majority if e2 != majority else ""
            x, y = votes_rng.integers(0, 8000, 2)
            writer.writerow(
                [
                    image_id,
                    f"{slide:03d}.tiff",
                    x,
                    y,
                    "synthetic breast-like",
                    SCANNERS[scanner][0],
                    "synthetic",
                    "Human",
                    majority,
                    e2,
                    e3,
                    majority,
                ]
            )
    log.info("wrote %d synthetic figures from %d slides to %s", n, n_slides, root)


def write_atnorm(root: Path, n: int = 120, seed: int = 5, votes: bool = False) -> None:
    """A folder in the AtNorM layout (``Atypical/``, ``Normal/``; numbered PNGs, as published) drawn from another
    lab than ``write_midog25``'s, with the flaws of the real AtNorM-Br: one crop filed twice under its class, one
    filed under both. ``votes``: also the expert-votes CSV (``Filename, Expert_1..3, Majority``)."""
    pixels, meta = synthetic_figures(n, seed, n_slides=n // 4)
    files = [("Atypical" if label else "Normal", i) for i, (label, _, _) in enumerate(meta)]
    copies = [(files[0][0], 0, n), (files[1][0], 1, n + 1)]  # figure 0 filed twice under its class
    copies.append(("Normal" if files[1][0] == "Atypical" else "Atypical", 1, n + 2))  # figure 1 under both
    for folder in ("Atypical", "Normal"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for folder, source, number in [(folder, i, i) for folder, i in files] + copies:
        Image.fromarray(pixels[source]).save(root / folder / f"{number}.png")
        call = "Atypical" if folder == "Atypical" else "Normal"
        rows.append([f"{folder}/{number}.png", call, call, "Normal" if number % 7 == 0 else call, call])
    if votes:
        with (root / "votes.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["Filename", "Expert_1", "Expert_2", "Expert_3", "Majority"], *rows])


def write_case(
    case_dir: Path, pages: np.ndarray, name: str = "stack", fmt: str = "tiff", pixel_size_um: float | None = None
) -> Path:
    """A Grand Challenge input folder: ``inputs.json`` + ``images/<interface>/<name>.<fmt>`` (multi-page), its
    resolution recorded when ``pixel_size_um`` is given (TIFF dots per inch; .mha spacing in mm)."""
    image_dir = case_dir / "images" / INPUT_INTERFACE
    image_dir.mkdir(parents=True, exist_ok=True)
    path = image_dir / f"{name}.{fmt}"
    if fmt in ("tif", "tiff"):
        first, *rest = [Image.fromarray(p) for p in pages]
        resolution = {"dpi": (25_400 / pixel_size_um,) * 2} if pixel_size_um else {}
        first.save(path, save_all=True, append_images=rest, compression="tiff_adobe_deflate", **resolution)
    elif fmt == "mha":
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(pages), isVector=True)
        if pixel_size_um:
            image.SetSpacing((pixel_size_um / 1000, pixel_size_um / 1000, 1.0))
        sitk.WriteImage(image, str(path), True)
    else:
        raise ValueError(f"unknown stack format {fmt!r}")
    interface = {
        "slug": INPUT_INTERFACE,
        "kind": "Image",
        "super_kind": "Image",
        "relative_path": f"images/{INPUT_INTERFACE}",
        "example_value": None,
    }
    inputs = [{"file": None, "image": {"name": path.name}, "value": None, "interface": interface}]
    (case_dir / "inputs.json").write_text(json.dumps(inputs, indent=4) + "\n")
    return path
