"""MIDOG 2025 Track 2 container entry point: classify each mitotic figure of a stack as atypical or normal.

Contract (Grand Challenge algorithm, one case per run):
  input   INPUT_DIR/images/stacked-histopathology-roi-cropouts/<one file>.tif|.tiff (multi-page, 1..16 RGB pages
          of 128x128) or, when no TIFF is there, one .mha holding [N, H, W, 3] (or [N, H, W] grey)
  reading one policy for TIFF (tifffile, imagecodecs' codecs) and .mha (SimpleITK), implemented in reader.py;
          each page the file means, as RGB uint8, or a refusal:
          - unsigned integer samples of any bit depth are brought to 8 bits by their range, round(v * 255 /
            top), top the MaxSampleValue a TIFF states (a 12-bit camera's 4095), else 2**bits - 1 (16-bit:
            v / 257), and refused where a sample exceeds it; bilevel to 0/255;
          - float samples are scaled from [0, 1] (v * 255) and refused when any lies outside it or is not
            finite: [0, 1] is the convention of float images, and a 0-255 float page fails loudly instead of
            being clamped to white;
          - signed integer, complex and undefined samples are refused by name ("signed int16 samples are not
            supported"): a signed or complex photograph has no agreed black and white;
          - grey pages (TIFF MinIsBlack or MinIsWhite, a 1-component .mha) are served as RGB, the grey value in
            each channel, with a warning; palette and CMYK pages are converted to RGB, YCbCr only inside JPEG;
            extra samples (alpha) are dropped and ICC profiles ignored; other colour spaces are refused by name;
          - TIFF pages that are not figures (NewSubfileType: reduced-resolution overview, transparency mask) are
            skipped with a warning, so the answer has one entry per figure; SubIFDs are never read;
          - a page with a side more than 2x from 128 is warned about (the graph resizes every page to its input);
          - a file tifffile had to repair (a broken IFD chain, a missing strip) is refused; before tifffile
            reads it, the main IFD chain is walked from the header: one that loops back, or declares a side of 0,
            more than 64 pages, pages over 4096 x 4096 or over 1 GiB of samples, is refused undecoded; so is a
            JPEG or JPEG 2000 strip or tile whose own header declares more pixels than its page gives it
          - an .mha's data lies in the file itself (ElementDataFile = LOCAL) or in a regular file beside it in the
            input folder; any other place (a path, "..", a symlink, a FIFO, a file list) is refused unread, and
            its header's sizes are checked before decoding by the same limits (declared.MAX_DECLARED_PAGES,
            MAX_PAGE_PIXELS, MAX_DECLARED_BYTES)
  output  OUTPUT_DIR/multiple-mitotic-figure-classification.json: a list with one
          {"class": "normal" | "atypical", "confidence": P(atypical) as a float} per figure, in page order; each
          page runs through the model alone, so its answer does not depend on the other pages of its stack
  pixels  when the model records the pixel size it was trained at, each page whose file records a resolution (TIFF
          XResolution/YResolution, .mha spacing in mm) is resampled to it; other pages are served as they are
  model   the Grand Challenge model tarball at /opt/ml/model when it holds a manifest, else the model/ folder
          baked next to this file; a manifest.json (schema in contracts.py) names the ONNX ensemble's graphs
          (the image holds only the one a GPU serves: ``training upload``), which one each device serves, the
          sha256 of each file and the decision threshold chosen on out-of-fold predictions
  device  --device, else the MIDOG_DEVICE environment variable (the image sets cuda), else auto; cuda refuses to
          answer unless ONNX Runtime's CUDA provider is the active one
Exit 0 with the answer written, or non-zero with one line on stderr and no output file, one code per class of
failure:
  1  anything unforeseen (a bug; --debug shows its traceback)
  2  the case's input: no or unreadable input folder, no stack or more than one, a file that is unreadable,
     damaged or refused by the reading policy
  3  the output folder: cannot be created or written (checked before the model loads)
  4  the model folder: manifest missing, not UTF-8 or invalid (a file named outside the folder too), a file of
     the graph about to load missing or with another sha256 than the manifest's (files of graphs the run does
     not load are not read), a graph that fails on a page or answers anything but one probability in [0, 1]
  5  the device: --device cuda without an active CUDA provider
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from contracts import (
    ANSWER_FILENAME,
    INPUT_INTERFACE,
    MANIFEST_FILENAME,
    ContractError,
    Device,
    ModelManifest,
    build_answer,
    resample_to_pixel_size,
    validate_answer,
)
from reader import TIFF_SUFFIXES, InputError, read_stack

INPUT_DIR = Path("/input")
OUTPUT_DIR = Path("/output")
GC_MODEL_DIR = Path("/opt/ml/model")
APP_DIR = Path("/opt/app")  # where the image holds this file
BAKED_MODEL_DIR = Path(__file__).resolve().parent / "model"
DEVICE_ENV = "MIDOG_DEVICE"
DEVICES = ("auto", "cuda", "cpu")
STACK_SUBDIR = Path("images") / INPUT_INTERFACE

log = logging.getLogger("process")


class OutputError(OSError):
    """The output folder cannot be written."""


class DeviceError(RuntimeError):
    """The requested execution provider is not active."""


EXIT_CODES: dict[type[Exception], int] = {InputError: 2, OutputError: 3, ContractError: 4, DeviceError: 5}


def _shorter(path: Path) -> str:
    return str(path) if len(str(path)) <= 200 else f"{str(path)[:60]}...{str(path)[-60:]}"


def find_stack(input_dir: Path) -> Path:
    """The case's one stack: a regular file in the stack folder (a symlink only where it stays inside the input
    folder). InputError otherwise, naming the folder (shortened when the path is too long to name)."""
    folder = input_dir / STACK_SUBDIR
    shown = _shorter(folder)
    try:
        if not input_dir.is_dir():
            what = "not a folder" if input_dir.exists() else "no such folder"
            raise InputError(f"{_shorter(input_dir)}: {what}; --input is a case folder holding {STACK_SUBDIR}/<stack>")
        if not folder.is_dir():
            raise InputError(f"{shown}: no such folder (a case folder holds {STACK_SUBDIR}/<stack>)")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        inside = input_dir.resolve()
    except OSError as err:
        raise InputError(f"{shown}: unreadable folder ({err.__class__.__name__}: {err.strerror})") from None
    for suffixes in (TIFF_SUFFIXES, (".mha",)):
        found = [p for p in files if p.suffix.lower() in suffixes]
        if len(found) > 1:
            raise InputError(f"{shown}: expected one stack, found {', '.join(p.name for p in found)}")
        if found:
            if inside not in found[0].resolve().parents:
                raise InputError(f"{found[0].name}: a link to a file outside the input folder: refused")
            return found[0]
    raise InputError(f"{shown}: no .tif, .tiff or .mha image")


def resolve_model_dir(explicit: Path | None) -> Path:
    if explicit is not None:
        log.info("model folder %s (--model)", explicit)
        return explicit
    if (GC_MODEL_DIR / MANIFEST_FILENAME).is_file():
        log.info("model folder %s: Grand Challenge's model tarball", GC_MODEL_DIR)
        return GC_MODEL_DIR
    where = "baked into the image" if BAKED_MODEL_DIR.parent == APP_DIR else "beside process.py (no --model given)"
    log.info("model folder %s: %s (no manifest under %s)", BAKED_MODEL_DIR, where, GC_MODEL_DIR)
    return BAKED_MODEL_DIR


class OnnxEnsemble:
    """The exported ONNX ensemble in one ONNX Runtime session."""

    def __init__(self, model_dir: Path, device: str, quiet: bool = True, precision: str | None = None):
        import onnxruntime as ort

        self.manifest = ModelManifest.load(model_dir)
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
            if precision is None and self.manifest.graph_for("cpu")[0] != self.precision:  # else: already open
                self.precision, self.session = self._open(model_dir, "cpu", precision)
                self.provider = self.session.get_providers()[0]

    def _open(self, model_dir: Path, device: Device, precision: str | None) -> tuple[str, Any]:
        """The precision and a session of the graph the manifest serves on ``device`` (fp16 on CUDA, int8 on the
        CPU, when they passed parity with fp32 at export), or of the ``precision`` asked for (benchmarks and
        predict compare graphs). Only that graph's files are verified against the manifest, just before loading."""
        import onnxruntime as ort

        if precision is None:
            served, graph = self.manifest.graph_for(device)
        elif precision in self.manifest.graphs:
            served, graph = precision, self.manifest.graphs[precision]
        else:
            raise ContractError(f"{model_dir}: no {precision} graph (has {', '.join(self.manifest.graphs)})")
        self.manifest.verify_graph(model_dir, served)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        try:
            return served, ort.InferenceSession(str(model_dir / graph.file), providers=providers)
        except Exception as err:  # ONNX Runtime's own error types; the file is the model folder's problem
            raise ContractError(f"{model_dir / graph.file}: ONNX Runtime cannot open it ({err})") from None

    def at_model_pixel_size(self, pages: list[np.ndarray], pixel_sizes_um: Sequence[float | None]) -> list[np.ndarray]:
        """Each page with a known pixel size resampled to the one the model was trained at (when it records one)."""
        target = self.manifest.pixel_size_um
        if target is None:
            return pages
        unknown = sum(size is None for size in pixel_sizes_um)
        if unknown:
            log.warning(
                "%d of %d page(s) record no pixel size; served as they are (the model was trained at %.3f um/px)",
                unknown,
                len(pages),
                target,
            )
        return [
            page if size is None else resample_to_pixel_size(page, size, target)
            for page, size in zip(pages, pixel_sizes_um, strict=True)
        ]

    def predict(self, pages: list[np.ndarray], pixel_sizes_um: Sequence[float | None] | None = None) -> np.ndarray:
        """P(atypical) per page, in page order, each page run alone: the int8 graph quantizes its activations over
        the whole run (ONNX Runtime's dynamic quantization), so in a batch a page's answer would depend on the
        other pages. ``pixel_sizes_um``: each page's, for resampling to the model's; None: every page as it is."""
        if pixel_sizes_um is not None:
            pages = self.at_model_pixel_size(pages, pixel_sizes_um)
        probs = np.empty(len(pages), dtype=np.float64)
        for i, page in enumerate(pages):
            try:
                (out,) = self.session.run([self.manifest.output_name], {self.manifest.input_name: page[None]})
            except Exception as err:  # ONNX Runtime's own error types: a graph that cannot take a page
                raise ContractError(f"the model's graph failed on page {i + 1} ({one_line(err)})") from None
            out = np.asarray(out)
            if out.shape != (1,) or out.dtype.kind != "f" or not (0 <= out[0] <= 1):
                raise ContractError(
                    f"the model's graph answered {out.dtype} {list(out.shape)} {out.ravel()[:2]} for page {i + 1}, "
                    "not one probability in [0, 1]"
                )
            probs[i] = float(out[0])
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


def check_output_folder(output_dir: Path) -> None:
    """Create the output folder if needed, prove it writable, and remove an earlier answer (a failed run leaves
    none): before the model loads, so a run that cannot deliver fails in a second, not after inference."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
        (output_dir / ANSWER_FILENAME).unlink(missing_ok=True)
        for stale in output_dir.glob(f".{ANSWER_FILENAME}.*.tmp"):  # an earlier run killed before its rename
            stale.unlink(missing_ok=True)
    except OSError as err:
        raise OutputError(
            f"{output_dir}: output folder not writable ({err.__class__.__name__}: {err.strerror})"
        ) from None


def run(input_dir: Path, output_dir: Path, model_dir: Path, device: str, quiet: bool = True) -> list[dict]:
    started = time.perf_counter()
    check_output_folder(output_dir)
    stack = find_stack(input_dir)
    case = read_stack(stack)
    sizes = sorted(
        {f"at {s:.3f} um/px" if s is not None else "with no pixel size recorded" for s in case.pixel_sizes_um}
    )
    log.info("read %s: %d page(s) %s", stack.name, len(case.pages), ", ".join(sizes))
    ensemble = OnnxEnsemble(model_dir, device, quiet)
    log.info(
        "model %s (%s, %d folds, threshold %.4f, %s) in %s on %s",
        model_dir,
        ensemble.manifest.backbone,
        ensemble.manifest.folds,
        ensemble.manifest.threshold,
        f"trained at {size} um/px" if (size := ensemble.manifest.pixel_size_um) else "no pixel size of its own",
        ensemble.precision,
        ensemble.provider,
    )
    probs = ensemble.predict(case.pages, pixel_sizes_um=case.pixel_sizes_um)
    answer = build_answer(probs, ensemble.manifest.threshold)
    validate_answer(answer, len(case.pages))
    try:
        write_json_atomically(answer, output_dir / ANSWER_FILENAME)
    except OSError as err:  # the folder was writable before inference; a full disk, say, can still refuse
        raise OutputError(f"{output_dir}: answer not written ({err.__class__.__name__}: {err.strerror})") from None
    log.info("wrote %s in %.2f s", output_dir / ANSWER_FILENAME, time.perf_counter() - started)
    return answer


def one_line(err: Exception) -> str:
    """Library messages (ITK's especially) span lines; the contract is one line on stderr."""
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=INPUT_DIR, help=f"case folder (default {INPUT_DIR})")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR, help=f"output folder (default {OUTPUT_DIR})")
    parser.add_argument(
        "--model",
        type=Path,
        help=f"model folder (default {GC_MODEL_DIR} if it has a manifest, "
        f"else {BAKED_MODEL_DIR.name}/ next to this file)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=os.environ.get(DEVICE_ENV) or "auto",
        help=f"cuda: fail unless the CUDA provider is active (default: ${DEVICE_ENV}, else auto)",
    )
    parser.add_argument("--debug", action="store_true", help="full tracebacks and onnxruntime's own log")
    args = parser.parse_args(argv)
    if args.device not in DEVICES:  # argparse checks choices on the command line, not on a default
        parser.error(f"{DEVICE_ENV}={args.device!r}: expected one of {', '.join(DEVICES)}")
    try:
        os.fstat(2)
    except OSError:  # started with stderr closed: the log goes nowhere rather than failing the run
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (fd 2 lives as long as the process)
    sys.stderr.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 is logged, not a logging error
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        run(args.input, args.output, resolve_model_dir(args.model), args.device, quiet=not args.debug)
    except tuple(EXIT_CODES) as err:
        if args.debug:
            raise
        log.error("%s", one_line(err))
        return next(code for kind, code in EXIT_CODES.items() if isinstance(err, kind))
    except Exception as err:  # one line, not a traceback wall; --debug shows the traceback
        if args.debug:
            raise
        log.error("failed: %s: %s", err.__class__.__name__, one_line(err))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
