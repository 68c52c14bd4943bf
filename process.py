"""MIDOG 2025 Track 2 container entry point: classify each mitotic figure of a stack as atypical or normal.

Contract (Grand Challenge algorithm, one case per run):
  input   INPUT_DIR/images/stacked-histopathology-roi-cropouts/<one file>.tif|.tiff (multi-page, 1..16 RGB pages
          of 128x128) or, when no TIFF is there, one .mha holding [N, H, W, 3]
  output  OUTPUT_DIR/multiple-mitotic-figure-classification.json: a list with one
          {"class": "normal" | "atypical", "confidence": P(atypical) as a float} per page, in page order
  pixels  when the model records the pixel size it was trained at, each page whose file records a resolution (TIFF
          XResolution/YResolution, .mha spacing in mm) is resampled to it; other pages are served as they are
  model   the Grand Challenge model tarball at /opt/ml/model when it holds a manifest, else the model/ folder
          baked next to this file; a manifest.json (schema in contracts.py) names the ONNX ensemble, its
          sha256 and the decision threshold chosen on out-of-fold predictions.
  device  --device, else the MIDOG_DEVICE environment variable (the image sets cuda), else auto; cuda refuses to
          answer unless ONNX Runtime's CUDA provider is the active one
Exit 0 with the answer written, or non-zero with one line on stderr and no output file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageSequence

from contracts import (
    ANSWER_FILENAME,
    INPUT_INTERFACE,
    MANIFEST_FILENAME,
    MAX_PAGES,
    PLAUSIBLE_PIXEL_SIZE_UM,
    ContractError,
    Device,
    ModelManifest,
    build_answer,
    resample_to_pixel_size,
    validate_answer,
)

INPUT_DIR = Path("/input")
OUTPUT_DIR = Path("/output")
GC_MODEL_DIR = Path("/opt/ml/model")
BAKED_MODEL_DIR = Path(__file__).resolve().parent / "model"
DEVICE_ENV = "MIDOG_DEVICE"
DEVICES = ("auto", "cuda", "cpu")
STACK_SUBDIR = Path("images") / INPUT_INTERFACE
TIFF_SUFFIXES = (".tif", ".tiff")
MAX_PAGE_PIXELS = 4096 * 4096  # a page declaring more is a decompression bomb, not a 128 px crop-out
UM_PER_RESOLUTION_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre (1: no unit)

log = logging.getLogger("process")


class InputError(ValueError):
    """The case's input cannot be read as a stack of RGB pages."""


class DeviceError(RuntimeError):
    """The requested execution provider is not active."""


def find_stack(input_dir: Path) -> Path:
    folder = input_dir / STACK_SUBDIR
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for suffixes in (TIFF_SUFFIXES, (".mha",)):
        found = [p for p in files if p.suffix.lower() in suffixes]
        if len(found) > 1:
            raise InputError(f"{folder}: expected one stack, found {', '.join(p.name for p in found)}")
        if found:
            return found[0]
    raise InputError(f"{folder}: no .tif, .tiff or .mha image")


@dataclass(frozen=True)
class Stack:
    """A case's pages, RGB uint8 [H, W, 3] in file order, and the micrometres per pixel each file page records
    (None where it records none, or nothing a microscope scan would have)."""

    pages: list[np.ndarray]
    pixel_sizes_um: list[float | None]


def plausible_pixel_size(um: float) -> float | None:
    low, high = PLAUSIBLE_PIXEL_SIZE_UM
    return um if low <= um <= high else None


def tiff_pixel_size(tags) -> float | None:
    """The mean of the page's X and Y pixel size, from its XResolution, YResolution and ResolutionUnit tags."""
    try:
        unit = UM_PER_RESOLUTION_UNIT.get(int(tags.get(296, 2)))  # TIFF's default unit is the inch
        x_res, y_res = float(tags.get(282, 0)), float(tags.get(283, 0))
    except (TypeError, ValueError, ZeroDivisionError):  # a damaged tag costs the resampling, not the answer
        return None
    if unit is None or not x_res > 0 or not y_res > 0:
        return None
    return plausible_pixel_size((unit / x_res + unit / y_res) / 2)


def read_tiff(path: Path) -> Stack:
    Image.MAX_IMAGE_PIXELS = MAX_PAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about damaged tags before failing; the failure is reported
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            pages, sizes = [], []
            for page in ImageSequence.Iterator(im):
                pages.append(np.asarray(page.convert("RGB")))
                sizes.append(tiff_pixel_size(page.tag_v2))
            return Stack(pages, sizes)


def read_mha(path: Path) -> Stack:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(f"{path.name}: expected RGB pixels, got {image.GetNumberOfComponentsPerPixel()} component(s)")
    array = sitk.GetArrayFromImage(image)  # [N, H, W, 3] for a stack, [H, W, 3] for a single page
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise InputError(f"{path.name}: expected an RGB stack [N, H, W, 3], got shape {list(array.shape)}")
    if array.dtype != np.uint8:
        raise InputError(f"{path.name}: expected uint8 pixels, got {array.dtype}")
    x_mm, y_mm = image.GetSpacing()[:2]  # ITK's unit is the millimetre; its default, 1.0, is no scan's
    return Stack(list(array), [plausible_pixel_size(1000 * (x_mm + y_mm) / 2)] * len(array))


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[IO[bytes]]:
    """libtiff and ITK report damaged files straight to file descriptor 2, a line per problem: keep that off the
    container's stderr (whose contract is one line) and hand it to the caller, who may quote its first line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def read_stack(path: Path) -> Stack:
    """All pages, in file order, as RGB uint8 [H, W, 3], with the pixel size each records."""
    if path.stat().st_size == 0:
        raise InputError(f"{path.name}: empty file")
    with native_stderr_captured() as native:
        try:
            stack = read_tiff(path) if path.suffix.lower() in TIFF_SUFFIXES else read_mha(path)
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise InputError(f"{path.name}: refused, declared size too large ({err})") from None
        except Exception as err:  # decoders fail in many ways on damaged files; each is this file's problem
            native.seek(0)
            detail = next((line.strip() for line in native.read().decode(errors="replace").splitlines()), "")
            raise InputError(f"{path.name}: unreadable image ({err.__class__.__name__}: {err})"
                             + (f" [decoder: {detail}]" if detail else "")) from None  # fmt: skip
    if not stack.pages:
        raise InputError(f"{path.name}: no pages")
    if len(stack.pages) > MAX_PAGES:
        log.warning("%s: %d pages, more than the challenge's %d; answering all", path.name, len(stack.pages),
                    MAX_PAGES)  # fmt: skip
    return stack


def resolve_model_dir(explicit: Path | None) -> Path:
    if explicit is not None:
        log.info("model folder %s (--model)", explicit)
        return explicit
    if (GC_MODEL_DIR / MANIFEST_FILENAME).is_file():
        log.info("model folder %s: Grand Challenge's model tarball", GC_MODEL_DIR)
        return GC_MODEL_DIR
    log.info("model folder %s: baked into the image (no manifest under %s)", BAKED_MODEL_DIR, GC_MODEL_DIR)
    return BAKED_MODEL_DIR


class OnnxEnsemble:
    """The exported ONNX ensemble in one ONNX Runtime session."""

    def __init__(self, model_dir: Path, device: str, quiet: bool = True, precision: str | None = None):
        import onnxruntime as ort

        self.manifest = ModelManifest.load(model_dir)
        self.manifest.verify_files(model_dir)
        if quiet:  # a CUDA library that fails to load is checked below; ORT's own report of it is a wall of text
            ort.set_default_logger_severity(4)
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise DeviceError(f"device cuda: this onnxruntime build has no CUDA provider (has {available})")
        wants_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
        self.precision, self.session = self._open(model_dir, "cuda" if wants_cuda else "cpu", precision)
        # onnxruntime falls back to CPU without raising when CUDA cannot load: check what is really active
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise DeviceError(
                "device cuda: the CUDA provider did not load (no GPU visible, or CUDA 12 / cuDNN 9 libraries "
                "missing); --debug shows onnxruntime's report"
            )
        if wants_cuda and self.provider != "CUDAExecutionProvider":
            log.warning("CUDA provider did not load; running on %s with the CPU's graph", self.provider)
            self.precision, self.session = self._open(model_dir, "cpu", precision)
            self.provider = self.session.get_providers()[0]

    def _open(self, model_dir: Path, device: Device, precision: str | None) -> tuple[str, Any]:
        """The precision and a session of the graph the manifest serves on ``device`` (fp16 on CUDA, int8 on the
        CPU, when they passed parity with fp32 at export), or of the ``precision`` asked for (benchmarks and
        predict compare graphs)."""
        import onnxruntime as ort

        served, graph = self.manifest.graph_for(device)
        if precision is not None:
            if precision not in self.manifest.graphs:
                raise ContractError(f"{model_dir}: no {precision} graph (has {', '.join(self.manifest.graphs)})")
            served, graph = precision, self.manifest.graphs[precision]
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        return served, ort.InferenceSession(str(model_dir / graph), providers=providers)

    def at_model_pixel_size(self, pages: list[np.ndarray],
                            pixel_sizes_um: Sequence[float | None]) -> list[np.ndarray]:  # fmt: skip
        """Each page with a known pixel size resampled to the one the model was trained at (when it records one)."""
        target = self.manifest.pixel_size_um
        if target is None:
            return pages
        unknown = sum(size is None for size in pixel_sizes_um)
        if unknown:
            log.warning("%d of %d page(s) record no pixel size; served as they are (the model was trained at %.3f "
                        "um/px)", unknown, len(pages), target)  # fmt: skip
        return [page if size is None else resample_to_pixel_size(page, size, target)
                for page, size in zip(pages, pixel_sizes_um, strict=True)]  # fmt: skip

    def predict(self, pages: list[np.ndarray], max_batch: int = MAX_PAGES,
                pixel_sizes_um: Sequence[float | None] | None = None) -> np.ndarray:  # fmt: skip
        """P(atypical) per page, in page order; pages of one size go through together, ``max_batch`` at a time
        (a challenge stack is one batch; ``python -m training predict`` runs whole datasets through here).
        ``pixel_sizes_um``: each page's, for resampling to the model's; None: every page as it is."""
        if pixel_sizes_um is not None:
            pages = self.at_model_pixel_size(pages, pixel_sizes_um)
        probs = np.empty(len(pages), dtype=np.float64)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, page in enumerate(pages):
            by_shape.setdefault(page.shape, []).append(i)
        for same_shape in by_shape.values():
            for start in range(0, len(same_shape), max_batch):
                indices = same_shape[start : start + max_batch]
                batch = np.ascontiguousarray(np.stack([pages[i] for i in indices]))
                (out,) = self.session.run([self.manifest.output_name], {self.manifest.input_name: batch})
                probs[indices] = out.astype(np.float64)
        return probs


def write_json_atomically(obj, path: Path) -> None:
    """Write next to the target, then rename: the output file is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the answer from anyone but the container's user
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(input_dir: Path, output_dir: Path, model_dir: Path, device: str, quiet: bool = True) -> list[dict]:
    started = time.perf_counter()
    (output_dir / ANSWER_FILENAME).unlink(missing_ok=True)  # a failed run leaves no answer, not an old one
    stack = find_stack(input_dir)
    case = read_stack(stack)
    sizes = sorted({f"{s:.3f}" if s is not None else "none" for s in case.pixel_sizes_um})
    log.info("read %s: %d page(s) at %s um/px", stack.name, len(case.pages), ", ".join(sizes))
    ensemble = OnnxEnsemble(model_dir, device, quiet)
    log.info("model %s (%s, %d folds, threshold %.4f, trained at %s um/px) in %s on %s", model_dir,
             ensemble.manifest.backbone, ensemble.manifest.folds, ensemble.manifest.threshold,
             ensemble.manifest.pixel_size_um or "any", ensemble.precision, ensemble.provider)  # fmt: skip
    probs = ensemble.predict(case.pages, pixel_sizes_um=case.pixel_sizes_um)
    answer = build_answer(probs, ensemble.manifest.threshold)
    validate_answer(answer, len(case.pages))
    write_json_atomically(answer, output_dir / ANSWER_FILENAME)
    log.info("wrote %s in %.2f s", output_dir / ANSWER_FILENAME, time.perf_counter() - started)
    return answer


def one_line(err: Exception) -> str:
    """Library messages (ITK's especially) span lines; the contract is one line on stderr."""
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=INPUT_DIR, help=f"case folder (default {INPUT_DIR})")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR, help=f"output folder (default {OUTPUT_DIR})")
    parser.add_argument("--model", type=Path, help=f"model folder (default {GC_MODEL_DIR} if it has a manifest, "
                        f"else {BAKED_MODEL_DIR.name}/ next to this file)")  # fmt: skip
    parser.add_argument("--device", choices=DEVICES, default=os.environ.get(DEVICE_ENV) or "auto",
                        help=f"cuda: fail unless the CUDA provider is active (default: ${DEVICE_ENV}, else auto)")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="full tracebacks and onnxruntime's own log")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        run(args.input, args.output, resolve_model_dir(args.model), args.device, quiet=not args.debug)
    except (InputError, ContractError, DeviceError) as err:
        if args.debug:
            raise
        log.error("%s", one_line(err))
        return 2
    except Exception as err:  # one line, not a traceback wall; --debug shows the traceback
        if args.debug:
            raise
        log.error("failed: %s: %s", err.__class__.__name__, one_line(err))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
