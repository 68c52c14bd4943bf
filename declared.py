"""What a stack declares, checked before a pixel of it is decoded: the input folder as the boundary and the sizes.

The TIFF's IFD chain is walked from its header (cycles, page count, page sizes), each JPEG or JPEG 2000 strip's own
codestream header is read, and an .mha's header is parsed as text; a stack declaring more than these limits, or
data outside the input folder, is refused in one line (``InputError``) before any decoder runs. ``reader`` calls
these first; the limits are stated here once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

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


class InputError(ValueError):
    """The case's input cannot be read as a stack of RGB pages."""


TIFF_JPEG = {6, 7, 33007, 34892}  # compressions whose codec returns RGB for YCbCr pages (tifffile decodes them)
TIFF_JPEG2000 = {33003, 33004, 33005, 34712}
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame: every JPEG process, not DHT/JPG/DAC
CODESTREAM_SLACK = 16  # a JPEG frame may pad its last rows and columns to whole blocks


JP2_HEADER_BYTES = 1 << 16  # a JPEG 2000 codestream's SIZ follows its SOC; a JP2 file's boxes before it are small
MAX_JPEG_SEGMENTS = 1024  # marker segments walked before a JPEG's frame header; real files have a dozen


def codestream_size(read: Callable[[int, int], bytes], count: int) -> tuple[int, int] | None:
    """(width, height) a JPEG or JPEG 2000 codestream of ``count`` bytes declares in its own header; None if it
    declares none. ``read(at, n)``: ``n`` bytes from ``at`` within the codestream. A JPEG's marker segments are
    walked by their lengths (their bodies are skipped, not read), so no padding before the frame header hides
    it."""
    head = read(0, min(count, JP2_HEADER_BYTES))
    at = head.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC then SIZ (also inside a JP2 file's boxes)
    if at >= 0 and len(head) >= at + 28:
        xsiz, ysiz, xo, yo = (int.from_bytes(head[at + 8 + 4 * i : at + 12 + 4 * i], "big") for i in range(4))
        return xsiz - xo, ysiz - yo
    if head[:2] != b"\xff\xd8":
        return None
    at = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        segment = read(at, 9) if at + 4 <= count else b""
        if len(segment) < 4 or segment[0] != 0xFF:
            return None
        if segment[1] == 0xFF:  # a fill byte before the marker
            at += 1
            continue
        if segment[1] in SOF_MARKERS and len(segment) == 9:
            return int.from_bytes(segment[7:9], "big"), int.from_bytes(segment[5:7], "big")
        if segment[1] == 0xDA:  # the scan begins: no frame header before it
            return None
        at += 2 + int.from_bytes(segment[2:4], "big")
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

        def read(at: int, n: int, start: int = offset) -> bytes:
            handle.seek(start + at)
            return handle.read(n)

        declared = codestream_size(read, count)
        if declared and (declared[0] > wanted[0] + CODESTREAM_SLACK or declared[1] > wanted[1] + CODESTREAM_SLACK):
            raise InputError(
                f"{where}: its {'tile' if page.is_tiled else 'strip'} {index + 1} declares {declared[0]}x{declared[1]} "
                f"pixels, the page holds {wanted[0]}x{wanted[1]}: refused"
            )


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
