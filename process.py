"""MIDOG 2025 Track 2 container entry point: classify each mitotic figure of a stack as atypical or normal.

Contract (Grand Challenge algorithm, one case per run):
  input   INPUT_DIR/images/stacked-histopathology-roi-cropouts/<one file>.tif|.tiff (multi-page, 1..16 RGB pages
          of 128x128) or, when no TIFF is there, one .mha holding [N, H, W, 3] (or [N, H, W] grey)
  reading one policy for TIFF (tifffile, imagecodecs' codecs) and .mha (SimpleITK); each page the file means, as
          RGB uint8, or a refusal:
          - unsigned integer samples of any bit depth are brought to 8 bits by their range, round(v * 255 /
            (2**bits - 1)) (16-bit: v / 257); bilevel to 0/255;
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
          - a file tifffile had to repair (a broken IFD chain, a missing strip) is refused
  output  OUTPUT_DIR/multiple-mitotic-figure-classification.json: a list with one
          {"class": "normal" | "atypical", "confidence": P(atypical) as a float} per figure, in page order; each
          page runs through the model alone, so its answer does not depend on the other pages of its stack
  pixels  when the model records the pixel size it was trained at, each page whose file records a resolution (TIFF
          XResolution/YResolution, .mha spacing in mm) is resampled to it; other pages are served as they are
  model   the Grand Challenge model tarball at /opt/ml/model when it holds a manifest, else the model/ folder
          baked next to this file; a manifest.json (schema in contracts.py) names the ONNX ensemble, its
          sha256 and the decision threshold chosen on out-of-fold predictions.
  device  --device, else the MIDOG_DEVICE environment variable (the image sets cuda), else auto; cuda refuses to
          answer unless ONNX Runtime's CUDA provider is the active one
Exit 0 with the answer written, or non-zero with one line on stderr and no output file, one code per class of
failure:
  1  anything unforeseen (a bug; --debug shows its traceback)
  2  the case's input: no or unreadable input folder, no stack or more than one, a file that is unreadable,
     damaged or refused by the reading policy
  3  the output folder: cannot be created or written (checked before the model loads)
  4  the model folder: manifest missing or invalid, a file whose sha256 differs, a graph that answers no
     probability
  5  the device: --device cuda without an active CUDA provider
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

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
CHALLENGE_SIDE = 128  # the challenge's crop-outs are 128 x 128
FAR_FACTOR = 2  # a side more than this factor from CHALLENGE_SIDE is warned about
UM_PER_RESOLUTION_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre (1: no unit)

log = logging.getLogger("process")


class InputError(ValueError):
    """The case's input cannot be read as a stack of RGB pages."""


class OutputError(OSError):
    """The output folder cannot be written."""


class DeviceError(RuntimeError):
    """The requested execution provider is not active."""


EXIT_CODES: dict[type[Exception], int] = {InputError: 2, OutputError: 3, ContractError: 4, DeviceError: 5}


def find_stack(input_dir: Path) -> Path:
    folder = input_dir / STACK_SUBDIR
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as err:
        raise InputError(f"{folder}: unreadable folder ({err.__class__.__name__}: {err.strerror})") from None
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
    """The mean of the page's X and Y pixel size, from its XResolution, YResolution and ResolutionUnit tags
    (a mapping of tag number to a number)."""
    try:
        unit = UM_PER_RESOLUTION_UNIT.get(int(tags.get(296, 2)))  # TIFF's default unit is the inch
        x_res, y_res = float(tags.get(282, 0)), float(tags.get(283, 0))
    except (TypeError, ValueError, ZeroDivisionError):  # a damaged tag costs the resampling, not the answer
        return None
    if unit is None or not x_res > 0 or not y_res > 0:
        return None
    return plausible_pixel_size((unit / x_res + unit / y_res) / 2)


def _rational(value):
    """A TIFF RATIONAL as tifffile gives it, (numerator, denominator), as a number; anything else unchanged."""
    if isinstance(value, tuple) and len(value) == 2 and value[1]:
        return value[0] / value[1]
    return value


def to_uint8(samples: np.ndarray, bits: int, where: str) -> np.ndarray:
    """Samples brought to 8 bits by their range (the reading policy): unsigned integers of ``bits`` bits scaled
    from [0, 2**bits - 1], rounded half up; bilevel to 0/255; floats scaled from [0, 1] and refused outside it;
    anything else (signed integers, complex, undefined) refused by name. Shape unchanged."""
    kind = samples.dtype.kind
    if kind == "b":
        return samples.astype(np.uint8) * np.uint8(255)
    if kind == "u":
        top = (1 << bits) - 1
        if samples.dtype == np.uint8 and bits == 8:
            return samples
        if samples.size and int(samples.max()) > top:
            raise InputError(f"{where}: samples exceed their declared {bits}-bit range")
        if bits <= 32:  # exact: floor(v * 255 / top + 1/2) in integers
            return ((samples.astype(np.uint64) * 510 + top) // (2 * top)).astype(np.uint8)
        return np.floor(samples.astype(np.float64) * (255 / top) + 0.5).astype(np.uint8)
    if kind == "f":
        finite = np.isfinite(samples).all()
        if not finite or (samples.size and (samples.min() < 0 or samples.max() > 1)):
            span = f"[{samples.min():g}, {samples.max():g}]" if finite else "non-finite values"
            raise InputError(f"{where}: {samples.dtype.name} samples must lie in [0, 1], found {span}")
        return np.floor(samples.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    name = {"i": f"signed int{bits}", "c": samples.dtype.name}.get(kind, f"{bits}-bit undefined ({kind})")
    raise InputError(f"{where}: {name} samples are not supported")


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


@dataclass(frozen=True)
class Page:
    """One figure as read: RGB uint8 [H, W, 3], its pixel size in um (None: unknown), whether it was grey."""

    pixels: np.ndarray
    pixel_size_um: float | None
    grey: bool = False


TIFF_JPEG = {6, 7, 33007, 34892}  # compressions whose codec returns RGB for YCbCr pages (tifffile decodes them)
TIFF_INK_CMYK = 1
NOT_A_FIGURE = {0b1: "a reduced-resolution overview", 0b100: "a transparency mask"}  # NewSubfileType bits


def tiff_page_role(page) -> str | None:
    """Why a page of the main IFD chain is not a figure (NewSubfileType, or the old SubfileType tifffile maps to
    it), or None for a figure. Pyramids in SubIFDs are never read: only the main chain holds figures."""
    roles = [role for bit, role in NOT_A_FIGURE.items() if int(page.subfiletype) & bit]
    return " and ".join(roles) or None


def decode_tiff_page(page, where: str) -> Page:
    """A TIFF page (tifffile's TiffPage) as RGB uint8, by photometric interpretation: grey (MinIsBlack,
    MinIsWhite), RGB, palette, CMYK, and YCbCr inside JPEG; extra samples (alpha) dropped, ICC profiles ignored
    (pixels as stored); anything else refused by name."""
    from tifffile import PHOTOMETRIC

    depth = max(page.imagedepth, 1)
    if depth > 1:
        raise InputError(f"{where}: a volume of {depth} slices (ImageDepth), not a 2-D figure")
    photometric = int(page.photometric)
    name = PHOTOMETRIC(photometric).name if photometric in PHOTOMETRIC._value2member_map_ else str(photometric)
    if photometric == PHOTOMETRIC.YCBCR and page.compression not in TIFF_JPEG:
        raise InputError(f"{where}: YCbCr pixels without JPEG compression are not supported")
    inks = page.samplesperpixel - len(page.extrasamples)
    if photometric == PHOTOMETRIC.SEPARATED and (page.tags.valueof(332, TIFF_INK_CMYK) != TIFF_INK_CMYK or inks != 4):
        raise InputError(f"{where}: separated inks other than CMYK are not supported")
    if photometric not in {0, 1, 2, 3, 5, 6}:
        raise InputError(f"{where}: photometric interpretation {name} is not supported")
    if not page.dataoffsets or not all(page.databytecounts):  # tifffile would fill a missing strip with zeros
        raise InputError(f"{where}: a strip or tile has no data")
    # [separate planes, depth, height, width, contiguous samples] -> [height, width, samples]
    shaped = page.asarray(squeeze=False)[:, 0]
    samples = np.moveaxis(shaped, 0, 2).reshape(shaped.shape[1], shaped.shape[2], -1)
    bits = int(page.bitspersample)
    if photometric == PHOTOMETRIC.PALETTE:
        colormap = page.colormap
        index = samples[..., 0]
        if colormap is None or index.dtype.kind not in "ub" or colormap.ndim != 2 or colormap.shape[0] != 3:
            raise InputError(f"{where}: a palette page without a usable colour map")
        if index.size and int(index.max()) >= colormap.shape[1]:
            raise InputError(f"{where}: palette indices beyond the colour map's {colormap.shape[1]} entries")
        return Page(to_uint8(colormap.T[index.astype(np.intp)], 16, where), None)
    if photometric in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE):
        grey = to_uint8(samples[..., 0], bits, where)
        return Page(grey_to_rgb(255 - grey if photometric == PHOTOMETRIC.MINISWHITE else grey), None, grey=True)
    if photometric == PHOTOMETRIC.SEPARATED:  # (1 - C)(1 - K), as ink on white paper
        cmyk = to_uint8(samples[..., :4], bits, where).astype(np.uint32)
        rgb = ((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) * 2 + 255) // 510
        return Page(rgb.astype(np.uint8), None)
    if samples.shape[-1] < 3:
        raise InputError(f"{where}: {name} page with {samples.shape[-1]} sample(s) per pixel")
    return Page(to_uint8(samples[..., :3], bits, where), None)


class _Complaints(logging.Handler):
    """tifffile reports what it repaired or skipped (a broken IFD chain, a bad tag) as log warnings, not errors."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


@contextlib.contextmanager
def tifffile_complaints() -> Iterator[list[str]]:
    logger = logging.getLogger("tifffile")
    handler, propagate = _Complaints(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def read_tiff(path: Path) -> tuple[list[Page], list[str]]:
    """Every figure of the main IFD chain, and a warning for each page skipped as not a figure. A file tifffile
    had to repair (its log's warnings) is refused: a repaired file can lose pages or pixels without failing."""
    import tifffile

    figures, skipped = [], []
    with tifffile_complaints() as complaints, tifffile.TiffFile(path) as tif:
        for index, page in enumerate(tif.pages):
            if page.imagelength * page.imagewidth * max(page.imagedepth, 1) > MAX_PAGE_PIXELS:  # before any decoding
                raise InputError(f"{path.name}: page {index + 1}: refused, declared size too large "
                                 f"({page.imagewidth}x{page.imagelength} pixels)")  # fmt: skip
            if complaints:
                break
            role = tiff_page_role(page)
            if role is not None:
                skipped.append(f"{path.name}: page {index + 1} is {role} (NewSubfileType {int(page.subfiletype)}), "
                               "not a figure; skipped")  # fmt: skip
                continue
            figure = decode_tiff_page(page, f"{path.name}: page {index + 1}")
            resolution = {tag: _rational(page.tags.valueof(tag)) for tag in (282, 283, 296) if tag in page.tags}
            figures.append(Page(figure.pixels, tiff_pixel_size(resolution), figure.grey))
        if complaints:
            raise InputError(f"{path.name}: damaged TIFF (tifffile: {complaints[0]})")
    return figures, skipped


def read_mha(path: Path) -> tuple[list[Page], list[str]]:
    """An .mha stack: [N, H, W] grey or [N, H, W, 3] RGB (or one such page without N), samples by the same policy
    as TIFF's; the spacing in mm is each page's pixel size."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    components = image.GetNumberOfComponentsPerPixel()
    if components not in (1, 3):
        raise InputError(f"{path.name}: expected 1 (grey) or 3 (RGB) components per pixel, got {components}")
    array = sitk.GetArrayFromImage(image)  # [N, H, W(, 3)] for a stack, [H, W(, 3)] for a single page
    page_dims = 2 if components == 1 else 3
    if array.ndim == page_dims:
        array = array[None]
    if array.ndim != page_dims + 1:
        raise InputError(f"{path.name}: expected a stack [N, H, W{', 3' if components == 3 else ''}], got shape "
                         f"{list(array.shape)}")  # fmt: skip
    if array.shape[1] * array.shape[2] > MAX_PAGE_PIXELS:
        raise InputError(f"{path.name}: refused, declared size too large ({array.shape[2]}x{array.shape[1]} pixels)")
    pixels = to_uint8(array, array.dtype.itemsize * 8, path.name)
    if components == 1:
        pixels = grey_to_rgb(pixels)
    x_mm, y_mm = image.GetSpacing()[:2]  # ITK's unit is the millimetre; its default, 1.0, is no scan's
    size = plausible_pixel_size(1000 * (x_mm + y_mm) / 2)
    return [Page(page, size, grey=components == 1) for page in pixels], []


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[IO[bytes]]:
    """ITK reports damaged files straight to file descriptor 2, a line per problem: keep that off the container's
    stderr (whose contract is one line) and hand it to the caller, who may quote its first line."""
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


def far_from_challenge_size(shape: tuple[int, ...]) -> bool:
    return not all(CHALLENGE_SIDE / FAR_FACTOR <= side <= CHALLENGE_SIDE * FAR_FACTOR for side in shape[:2])


def read_stack(path: Path) -> Stack:
    """All figures, in file order, as RGB uint8 [H, W, 3], with the pixel size each records (the reading policy:
    this module's docstring)."""
    with native_stderr_captured() as native:
        try:
            if path.stat().st_size == 0:
                raise InputError(f"{path.name}: empty file")
            figures, skipped = read_tiff(path) if path.suffix.lower() in TIFF_SUFFIXES else read_mha(path)
        except InputError:
            raise
        except Exception as err:  # decoders fail in many ways on damaged files; each is this file's problem
            native.seek(0)
            detail = next((line.strip() for line in native.read().decode(errors="replace").splitlines()), "")
            raise InputError(f"{path.name}: unreadable image ({err.__class__.__name__}: {err})"
                             + (f" [decoder: {detail}]" if detail else "")) from None  # fmt: skip
    for warning in skipped:  # logged here: while the decoders ran, file descriptor 2 was captured
        log.warning("%s", warning)
    if not figures:
        raise InputError(f"{path.name}: no figure pages")
    if len(figures) > MAX_PAGES:
        log.warning("%s: %d pages, more than the challenge's %d; answering all", path.name, len(figures),
                    MAX_PAGES)  # fmt: skip
    grey = sum(f.grey for f in figures)
    if grey:
        log.warning("%s: %d of %d page(s) are grey; served as RGB, the grey value in each channel", path.name, grey,
                    len(figures))  # fmt: skip
    far = sorted(
        {f"{f.pixels.shape[1]}x{f.pixels.shape[0]}" for f in figures if far_from_challenge_size(f.pixels.shape)}
    )
    if far:
        log.warning("%s: page size(s) %s far from the challenge's %dx%d; resized inside the graph", path.name,
                    ", ".join(far), CHALLENGE_SIDE, CHALLENGE_SIDE)  # fmt: skip
    return Stack([f.pixels for f in figures], [f.pixel_size_um for f in figures])


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

    def predict(self, pages: list[np.ndarray], pixel_sizes_um: Sequence[float | None] | None = None) -> np.ndarray:
        """P(atypical) per page, in page order, each page run alone: the int8 graph quantizes its activations over
        the whole run (ONNX Runtime's dynamic quantization), so in a batch a page's answer would depend on the
        other pages. ``pixel_sizes_um``: each page's, for resampling to the model's; None: every page as it is."""
        if pixel_sizes_um is not None:
            pages = self.at_model_pixel_size(pages, pixel_sizes_um)
        probs = np.empty(len(pages), dtype=np.float64)
        for i, page in enumerate(pages):
            (out,) = self.session.run([self.manifest.output_name], {self.manifest.input_name: page[None]})
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
    except OSError as err:
        raise OutputError(
            f"{output_dir}: output folder not writable ({err.__class__.__name__}: {err.strerror})"
        ) from None


def run(input_dir: Path, output_dir: Path, model_dir: Path, device: str, quiet: bool = True) -> list[dict]:
    started = time.perf_counter()
    check_output_folder(output_dir)
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
    parser.add_argument("--model", type=Path, help=f"model folder (default {GC_MODEL_DIR} if it has a manifest, "
                        f"else {BAKED_MODEL_DIR.name}/ next to this file)")  # fmt: skip
    parser.add_argument("--device", choices=DEVICES, default=os.environ.get(DEVICE_ENV) or "auto",
                        help=f"cuda: fail unless the CUDA provider is active (default: ${DEVICE_ENV}, "
                        "else auto)")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="full tracebacks and onnxruntime's own log")
    args = parser.parse_args(argv)
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
