"""MIDOG 2025 Track 2 container entry point: classify each mitotic figure of a stack as atypical or normal.

Contract (Grand Challenge algorithm, one case per run):
  input   INPUT_DIR/images/stacked-histopathology-roi-cropouts/<one file>.tif|.tiff (multi-page, 1..16 RGB pages
          of 128x128) or, when no TIFF is there, one .mha holding [N, H, W, 3]
  output  OUTPUT_DIR/multiple-mitotic-figure-classification.json: a list with one
          {"class": "normal" | "atypical", "confidence": P(atypical) as a float} per page, in page order
  model   the Grand Challenge model tarball at /opt/ml/model when it holds a manifest, else the model/ folder
          baked next to this file; a manifest.json (schema in contracts.py) names the ONNX ensemble, its
          sha256 and the decision threshold chosen on out-of-fold predictions.
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
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageSequence

from contracts import (
    ANSWER_FILENAME,
    INPUT_INTERFACE,
    MANIFEST_FILENAME,
    MAX_PAGES,
    ContractError,
    Device,
    ModelManifest,
    build_answer,
    validate_answer,
)

INPUT_DIR = Path("/input")
OUTPUT_DIR = Path("/output")
GC_MODEL_DIR = Path("/opt/ml/model")
BAKED_MODEL_DIR = Path(__file__).resolve().parent / "model"
STACK_SUBDIR = Path("images") / INPUT_INTERFACE
TIFF_SUFFIXES = (".tif", ".tiff")
MAX_PAGE_PIXELS = 4096 * 4096  # a page declaring more is a decompression bomb, not a 128 px crop-out

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


def read_tiff(path: Path) -> list[np.ndarray]:
    Image.MAX_IMAGE_PIXELS = MAX_PAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about damaged tags before failing; the failure is reported
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            return [np.asarray(page.convert("RGB")) for page in ImageSequence.Iterator(im)]


def read_mha(path: Path) -> list[np.ndarray]:
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
    return list(array)


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


def read_stack(path: Path) -> list[np.ndarray]:
    """All pages, in file order, as RGB uint8 [H, W, 3]."""
    if path.stat().st_size == 0:
        raise InputError(f"{path.name}: empty file")
    with native_stderr_captured() as native:
        try:
            pages = read_tiff(path) if path.suffix.lower() in TIFF_SUFFIXES else read_mha(path)
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise InputError(f"{path.name}: refused, declared size too large ({err})") from None
        except Exception as err:  # decoders fail in many ways on damaged files; each is this file's problem
            native.seek(0)
            detail = next((line.strip() for line in native.read().decode(errors="replace").splitlines()), "")
            raise InputError(f"{path.name}: unreadable image ({err.__class__.__name__}: {err})"
                             + (f" [decoder: {detail}]" if detail else "")) from None  # fmt: skip
    if not pages:
        raise InputError(f"{path.name}: no pages")
    if len(pages) > MAX_PAGES:
        log.warning("%s: %d pages, more than the challenge's %d; answering all", path.name, len(pages), MAX_PAGES)
    return pages


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
            raise DeviceError(f"--device cuda: this onnxruntime build has no CUDA provider (has {available})")
        wants_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
        self.precision, self.session = self._open(model_dir, "cuda" if wants_cuda else "cpu", precision)
        # onnxruntime falls back to CPU without raising when CUDA cannot load: check what is really active
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise DeviceError(
                "--device cuda: the CUDA provider did not load (no GPU visible, or CUDA 12 / cuDNN 9 libraries "
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

    def predict(self, pages: list[np.ndarray], max_batch: int = MAX_PAGES) -> np.ndarray:
        """P(atypical) per page, in page order; pages of one size go through together, ``max_batch`` at a time
        (a challenge stack is one batch; ``python -m training predict`` runs whole datasets through here)."""
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
    pages = read_stack(stack)
    log.info("read %s: %d page(s)", stack.name, len(pages))
    ensemble = OnnxEnsemble(model_dir, device, quiet)
    log.info("model %s (%s, %d folds, threshold %.4f) in %s on %s", model_dir, ensemble.manifest.backbone,
             ensemble.manifest.folds, ensemble.manifest.threshold, ensemble.precision, ensemble.provider)  # fmt: skip
    probs = ensemble.predict(pages)
    answer = build_answer(probs, ensemble.manifest.threshold)
    validate_answer(answer, len(pages))
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
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: fail unless the CUDA provider is active")  # fmt: skip
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
