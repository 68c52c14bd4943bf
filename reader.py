"""Reading a case's stack: every figure page of a multi-page TIFF or an .mha, as the pixels the file means.

The policy (process.py's contract docstring states it; this module is its one implementation): unsigned integer
samples of any bit depth brought to 8 bits by their range, floats from [0, 1] or refused, signed, complex and
undefined samples refused by name, grey pages served as RGB with a warning, TIFF pages that are not figures
(NewSubfileType) skipped with a warning, a page far from 128 x 128 warned about. TIFF through tifffile (with
imagecodecs' codecs), .mha through SimpleITK. Every refusal is an ``InputError`` with one line for the caller.
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

TIFF_SUFFIXES = (".tif", ".tiff")
MAX_PAGE_PIXELS = 4096 * 4096  # a page declaring more is a decompression bomb, not a 128 px crop-out
MAX_DECLARED_PAGES = 64  # the challenge stacks at most 16; a file declaring more than 4x that is refused unread
MAX_DECLARED_BYTES = 1 << 30  # the whole stack's decoded samples, as its header declares them
MHA_HEADER_BYTES = 1 << 16  # a MetaImage header is a few hundred bytes of text before the data
# MetaImage element types and their bytes per sample
MHA_ELEMENT_BYTES = {
    f"MET_{name}": size
    for size, names in (
        (1, "UCHAR CHAR"),
        (2, "USHORT SHORT"),
        (4, "UINT INT FLOAT"),
        (8, "ULONG LONG ULONG_LONG LONG_LONG DOUBLE"),
    )
    for name in names.split()
}
CHALLENGE_SIDE = 128  # the challenge's crop-outs are 128 x 128
FAR_FACTOR = 2  # a side more than this factor from CHALLENGE_SIDE is warned about
UM_PER_RESOLUTION_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre (1: no unit)

log = logging.getLogger("process")


class InputError(ValueError):
    """The case's input cannot be read as a stack of RGB pages."""


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


TIFF_JPEG = {6, 7, 33007, 34892}  # compressions whose codec returns RGB for YCbCr pages (tifffile decodes them)
TIFF_INK_CMYK = 1
NOT_A_FIGURE = {0b1: "a reduced-resolution overview", 0b100: "a transparency mask"}  # NewSubfileType bits


def tiff_page_role(page) -> str | None:
    """Why a page of the main IFD chain is not a figure (NewSubfileType, or the old SubfileType tifffile maps to
    it), or None for a figure. Pyramids in SubIFDs are never read: only the main chain holds figures."""
    roles = [role for bit, role in NOT_A_FIGURE.items() if int(page.subfiletype) & bit]
    return " and ".join(roles) or None


TIFF_JPEG2000 = {33003, 33004, 33005, 34712}
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame: every JPEG process, not DHT/JPG/DAC
CODESTREAM_SLACK = 16  # a JPEG frame may pad its last rows and columns to whole blocks


def codestream_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG or JPEG 2000 codestream's own header declares, from its first bytes; None if it
    declares none there."""
    at = head.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC then SIZ (also inside a JP2 file's boxes)
    if at >= 0 and len(head) >= at + 28:
        xsiz, ysiz, xo, yo = (int.from_bytes(head[at + 8 + 4 * i : at + 12 + 4 * i], "big") for i in range(4))
        return xsiz - xo, ysiz - yo
    i = 2 if head[:2] == b"\xff\xd8" else -1
    while 0 <= i < len(head) - 9:
        if head[i] != 0xFF:
            return None
        marker, length = head[i + 1], int.from_bytes(head[i + 2 : i + 4], "big")
        if marker in SOF_MARKERS:
            return int.from_bytes(head[i + 7 : i + 9], "big"), int.from_bytes(head[i + 5 : i + 7], "big")
        i += 2 + length
    return None


def check_codestreams(page, where: str) -> None:
    """Each JPEG or JPEG 2000 strip or tile declares, in its own header, no more than the page gives it: a 128 px
    page whose strip is really 20000 x 20000 pixels is refused before it is decoded (or answered from a crop)."""
    if page.compression not in TIFF_JPEG | TIFF_JPEG2000:
        return
    if page.is_tiled:
        wanted = (page.tilewidth, page.tilelength)
    else:
        wanted = (page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength))
    handle = page.parent.filehandle
    for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
        handle.seek(offset)
        declared = codestream_size(handle.read(min(count, 1 << 16)))
        if declared and (declared[0] > wanted[0] + CODESTREAM_SLACK or declared[1] > wanted[1] + CODESTREAM_SLACK):
            raise InputError(
                f"{where}: its {'tile' if page.is_tiled else 'strip'} {index + 1} declares {declared[0]}x{declared[1]} "
                f"pixels, the page holds {wanted[0]}x{wanted[1]}: refused"
            )


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


TIFF_TYPE_BYTES = {1: 1, 3: 2, 4: 4, 16: 8}  # BYTE, SHORT, LONG, LONG8: the types of the size tags


def _uint(data: bytes, order: str, size: int, at: int) -> int:
    """The unsigned integer of ``size`` bytes at ``at``, in the file's byte order ('<' or '>')."""
    return int(np.frombuffer(data, f"{order}u{size}", 1, at)[0])


def _tiff_value(data: bytes, order: str, entry: int, big: bool) -> list[int]:
    """An IFD entry's values of an integer type, inline or at its offset; [] for other types or out of file."""
    word = 8 if big else 4  # offsets and counts
    count = _uint(data, order, word, entry + 4)
    size = TIFF_TYPE_BYTES.get(_uint(data, order, 2, entry + 2))
    if size is None or count < 1 or count > 16:
        return []
    field = entry + 4 + word
    if size * count > word:  # not inline: the field holds the values' offset
        field = _uint(data, order, word, field)
    if field + size * count > len(data):
        return []
    return [int(v) for v in np.frombuffer(data, f"{order}u{size}", count, field)]


def check_tiff_declarations(path: Path) -> None:
    """The main IFD chain walked from the header before tifffile reads it: a chain that loops back, runs past the
    file, or holds more than ``MAX_DECLARED_PAGES`` pages is refused; so is a page declaring a zero side, more than
    ``MAX_PAGE_PIXELS`` pixels, or a stack declaring more than ``MAX_DECLARED_BYTES`` of samples."""
    if path.stat().st_size > MAX_DECLARED_BYTES:
        raise InputError(f"{path.name}: refused, a file over {MAX_DECLARED_BYTES >> 20} MiB is no stack of crop-outs")
    data = path.read_bytes()
    if len(data) < 8 or data[:2] not in (b"II", b"MM"):
        return  # not a TIFF header: tifffile's own refusal names it
    order = "<" if data[:2] == b"II" else ">"
    version = _uint(data, order, 2, 2)
    big = version == 43
    if version not in (42, 43) or (big and len(data) < 16):
        return
    word = 8 if big else 4  # offsets and counts
    offset = _uint(data, order, word, word)
    seen, total = set(), 0
    while offset:
        if offset in seen:
            raise InputError(f"{path.name}: damaged TIFF (its IFD chain loops back to an earlier page)")
        if len(seen) >= MAX_DECLARED_PAGES:
            raise InputError(f"{path.name}: refused, more than {MAX_DECLARED_PAGES} pages in its IFD chain")
        head = 8 if big else 2
        if offset + head > len(data):
            raise InputError(
                f"{path.name}: damaged TIFF (page {len(seen) + 1}'s IFD offset is past the end of the file)"
            )
        seen.add(offset)
        count = _uint(data, order, head, offset)
        step = 20 if big else 12
        end = offset + head + count * step
        if end + word > len(data):
            raise InputError(f"{path.name}: damaged TIFF (page {len(seen)}'s IFD runs past the end of the file)")
        tags = {}
        for entry in range(offset + head, end, step):
            tag = _uint(data, order, 2, entry)
            if tag in (256, 257, 258, 277, 32997):  # width, length, bits, samples, depth
                tags[tag] = _tiff_value(data, order, entry, big)
        width, length = (tags.get(t, [1])[0] for t in (256, 257))
        samples, depth = (tags.get(t, [1])[0] for t in (277, 32997))
        bits = max(tags.get(258) or [1])
        if min(width, length) < 1:
            raise InputError(f"{path.name}: page {len(seen)}: a side of 0 pixels declared")
        if width * length * max(depth, 1) > MAX_PAGE_PIXELS:
            raise InputError(
                f"{path.name}: page {len(seen)}: refused, declared size too large ({width}x{length} pixels)"
            )
        total += width * length * max(depth, 1) * max(samples, 1) * -(-bits // 8)
        if total > MAX_DECLARED_BYTES:
            raise InputError(f"{path.name}: refused, declares more than {MAX_DECLARED_BYTES >> 20} MiB of samples")
        offset = _uint(data, order, word, end)


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


def mha_header(path: Path) -> dict[str, str]:
    """The MetaImage header's fields (``Key = Value`` lines up to ``ElementDataFile``, always the last), read as
    text before anything decodes the file. InputError for a file with no such header."""
    with path.open("rb") as f:
        head = f.read(MHA_HEADER_BYTES)
    fields = {}
    for line in head.decode("latin-1").splitlines():
        key, equals, value = line.partition("=")
        if not equals:
            raise InputError(f"{path.name}: not a MetaImage header (line {line[:40]!r})")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields
    raise InputError(f"{path.name}: no ElementDataFile in the first {MHA_HEADER_BYTES} bytes of its header")


def check_mha_header(path: Path, fields: dict[str, str]) -> None:
    """The header's promises, checked before a pixel is decoded: the data in the file itself (``LOCAL``) or in a
    regular file beside it in the input folder, never elsewhere; every dimension at least 1; the declared pages,
    page size and decoded bytes within ``MAX_DECLARED_PAGES``, ``MAX_PAGE_PIXELS`` and ``MAX_DECLARED_BYTES``."""
    data = fields["ElementDataFile"]
    if data != "LOCAL":
        beside = path.parent / data
        inside = "/" not in data and "\\" not in data and data not in ("", ".", "..") and " " not in data
        if not inside or beside.is_symlink() or not beside.is_file():
            raise InputError(
                f"{path.name}: its data is {data!r}, not in the file itself nor a regular file beside it: refused"
            )
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        raise InputError(f"{path.name}: DimSize {fields.get('DimSize')!r} is not a list of integers") from None
    element = MHA_ELEMENT_BYTES.get(fields.get("ElementType", ""))
    if not dims or element is None:
        raise InputError(f"{path.name}: header without DimSize or with ElementType {fields.get('ElementType')!r}")
    if min(dims) < 1 or channels < 1:
        raise InputError(f"{path.name}: a dimension of size {min([*dims, channels])}: no pixels to read")
    pages = dims[2] if len(dims) > 2 else 1
    if pages > MAX_DECLARED_PAGES or dims[0] * dims[1] > MAX_PAGE_PIXELS:
        raise InputError(
            f"{path.name}: refused, declared size too large ({pages} page(s) of {dims[0]}x{dims[1]} pixels)"
        )
    if int(np.prod(dims, dtype=np.float64)) * channels * element > MAX_DECLARED_BYTES:
        raise InputError(f"{path.name}: refused, declares more than {MAX_DECLARED_BYTES >> 20} MiB of samples")


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
