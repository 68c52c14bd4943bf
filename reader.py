"""Reading a case's stack: every figure page of a multi-page TIFF or an .mha, as the pixels the file means.

The policy is stated once, in process.py's contract docstring ("reading"); this module is its one
implementation. TIFF through tifffile (with imagecodecs' codecs), .mha through SimpleITK. Every refusal is an
``InputError`` with one line for the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from contracts import MAX_PAGES, PLAUSIBLE_PIXEL_SIZE_UM
from declared import (
    MAX_PAGE_PIXELS,
    TIFF_JPEG,
    InputError,
    check_codestreams,
    check_mha_header,
    check_tiff_declarations,
    mha_header,
)

TIFF_SUFFIXES = (".tif", ".tiff")
CHALLENGE_SIDE = 128  # the challenge's crop-outs are 128 x 128
FAR_FACTOR = 2  # a side more than this factor from CHALLENGE_SIDE is warned about
UM_PER_RESOLUTION_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre (1: no unit)

log = logging.getLogger("process")


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


def to_uint8(samples: np.ndarray, bits: int, where: str, top: int | None = None) -> np.ndarray:
    """Samples brought to 8 bits by their range (the reading policy): unsigned integers scaled from [0, top],
    ``top`` the largest value the file states (TIFF MaxSampleValue, as 12-bit cameras write 12-bit values in 16-bit
    samples) or else 2**bits - 1, rounded half up; bilevel to 0/255; floats scaled from [0, 1] and refused outside
    it; anything else (signed integers, complex, undefined) refused by name. Shape unchanged."""
    kind = samples.dtype.kind
    if kind == "b":
        return samples.astype(np.uint8) * np.uint8(255)
    if kind == "u":
        full = (1 << bits) - 1
        top = full if top is None or not 0 < top < full else top
        if samples.dtype == np.uint8 and top == 255:
            return samples
        if samples.size and int(samples.max()) > top:
            range_ = f"stated range 0-{top}" if top != full else f"declared {bits}-bit range"
            raise InputError(f"{where}: samples exceed their {range_}")
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
    check_codestreams(page, where)
    # [separate planes, depth, height, width, contiguous samples] -> [height, width, samples]
    shaped = page.asarray(squeeze=False)[:, 0]
    samples = np.moveaxis(shaped, 0, 2).reshape(shaped.shape[1], shaped.shape[2], -1)
    bits = int(page.bitspersample)
    stated = page.tags.valueof(281)  # MaxSampleValue: one per sample, or one for all
    top = int(np.max(stated)) if stated is not None and np.size(stated) else None
    if photometric == PHOTOMETRIC.PALETTE:
        colormap = page.colormap
        index = samples[..., 0]
        if colormap is None or index.dtype.kind not in "ub" or colormap.ndim != 2 or colormap.shape[0] != 3:
            raise InputError(f"{where}: a palette page without a usable colour map")
        if index.size and int(index.max()) >= colormap.shape[1]:
            raise InputError(f"{where}: palette indices beyond the colour map's {colormap.shape[1]} entries")
        return Page(to_uint8(colormap.T[index.astype(np.intp)], 16, where), None)
    if photometric in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE):
        grey = to_uint8(samples[..., 0], bits, where, top)
        return Page(grey_to_rgb(255 - grey if photometric == PHOTOMETRIC.MINISWHITE else grey), None, grey=True)
    if photometric == PHOTOMETRIC.SEPARATED:  # (1 - C)(1 - K), as ink on white paper
        cmyk = to_uint8(samples[..., :4], bits, where, top).astype(np.uint32)
        rgb = ((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) * 2 + 255) // 510
        return Page(rgb.astype(np.uint8), None)
    if samples.shape[-1] < 3:
        raise InputError(f"{where}: {name} page with {samples.shape[-1]} sample(s) per pixel")
    return Page(to_uint8(samples[..., :3], bits, where, top), None)


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

    check_tiff_declarations(path)
    figures, skipped = [], []
    with tifffile_complaints() as complaints, tifffile.TiffFile(path) as tif:
        for index, page in enumerate(tif.pages):
            if page.imagelength * page.imagewidth * max(page.imagedepth, 1) > MAX_PAGE_PIXELS:  # before any decoding
                raise InputError(
                    f"{path.name}: page {index + 1}: refused, declared size too large "
                    f"({page.imagewidth}x{page.imagelength} pixels)"
                )
            if complaints:
                break
            role = tiff_page_role(page)
            if role is not None:
                skipped.append(
                    f"{path.name}: page {index + 1} is {role} (NewSubfileType {int(page.subfiletype)}), "
                    "not a figure; skipped"
                )
                continue
            figure = decode_tiff_page(page, f"{path.name}: page {index + 1}")
            resolution = {tag: _rational(page.tags.valueof(tag)) for tag in (282, 283, 296) if tag in page.tags}
            figures.append(Page(figure.pixels, tiff_pixel_size(resolution), figure.grey))
        if complaints:
            raise InputError(f"{path.name}: damaged TIFF (tifffile: {complaints[0]})")
    return figures, skipped


def read_mha(path: Path) -> tuple[list[Page], list[str]]:
    """An .mha stack: [N, H, W] grey or [N, H, W, 3] RGB (or one such page without N), samples by the same policy
    as TIFF's; the spacing in mm is each page's pixel size. The header is checked first (``check_mha_header``)."""
    import SimpleITK as sitk

    check_mha_header(path, mha_header(path))
    reader = sitk.ImageFileReader()
    reader.SetImageIO("MetaImageIO")
    try:
        str(path).encode()
        reader.SetFileName(str(path))
        image = reader.Execute()
    except UnicodeEncodeError:  # a name that is not UTF-8 aborts SimpleITK's process: hand it the open file instead
        fd = os.open(path, os.O_RDONLY)
        try:
            reader.SetFileName(f"/proc/self/fd/{fd}")
            image = reader.Execute()
        finally:
            os.close(fd)
    components = image.GetNumberOfComponentsPerPixel()
    if components not in (1, 3):
        raise InputError(f"{path.name}: expected 1 (grey) or 3 (RGB) components per pixel, got {components}")
    array = sitk.GetArrayFromImage(image)  # [N, H, W(, 3)] for a stack, [H, W(, 3)] for a single page
    page_dims = 2 if components == 1 else 3
    if array.ndim == page_dims:
        array = array[None]
    if array.ndim != page_dims + 1:
        raise InputError(
            f"{path.name}: expected a stack [N, H, W{', 3' if components == 3 else ''}], got shape {list(array.shape)}"
        )
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
    # in memory where the system allows (no temp dir needed: a container's may be read-only), else a temp file
    memfd = getattr(os, "memfd_create", None)
    with os.fdopen(memfd("decoder-stderr"), "w+b") if memfd else tempfile.TemporaryFile() as sink:
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
            raise InputError(
                f"{path.name}: unreadable image ({err.__class__.__name__}: {err})"
                + (f" [decoder: {detail}]" if detail else "")
            ) from None
    for warning in skipped:  # logged here: while the decoders ran, file descriptor 2 was captured
        log.warning("%s", warning)
    if not figures:
        raise InputError(f"{path.name}: no figure pages")
    if len(figures) > MAX_PAGES:
        log.warning("%s: %d pages, more than the challenge's %d; answering all", path.name, len(figures), MAX_PAGES)
    grey = sum(f.grey for f in figures)
    if grey:
        log.warning(
            "%s: %d of %d page(s) are grey; served as RGB, the grey value in each channel",
            path.name,
            grey,
            len(figures),
        )
    far = sorted(
        {f"{f.pixels.shape[1]}x{f.pixels.shape[0]}" for f in figures if far_from_challenge_size(f.pixels.shape)}
    )
    if far:
        log.warning(
            "%s: page size(s) %s far from the challenge's %dx%d; resized inside the graph",
            path.name,
            ", ".join(far),
            CHALLENGE_SIDE,
            CHALLENGE_SIDE,
        )
    return Stack([f.pixels for f in figures], [f.pixel_size_um for f in figures])
