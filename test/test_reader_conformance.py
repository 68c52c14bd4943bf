"""The stack reader's conformance matrix: every layout a writer produces is read to the pixels it means, or refused
with one line (process.py's reading policy).

Generated: photometric x 8/16 bits x planar layout x compression x tiling x byte order, each combination tifffile
can write, checked against an independent decode: the pixels written (scaled back by their range; JPEG: Pillow's
libtiff + libjpeg decode of the same file). The rest of the policy: test_reader_policy.py.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import tifffile
from PIL import Image

from reader import InputError, read_stack


def reference_pages(n: int = 2, side: int = 48) -> np.ndarray:
    """Smooth colour gradients with texture: every value 0..255 in each channel, and JPEG-friendly."""
    y, x = np.mgrid[0:side, 0:side] / (side - 1)
    pages = []
    for k in range(n):
        rgb = [(x + k / 3) % 1, y, (x * y + 0.25 * np.sin(7 * x + k)) % 1]
        pages.append(np.stack([np.rint(c * 255) for c in rgb], axis=-1))
    pages = np.array(pages, np.uint8)
    pages[:, 0, 0], pages[:, -1, -1] = 0, 255  # the range's ends
    return pages


REF = reference_pages()
GREY = np.rint(REF @ [0.299, 0.587, 0.114]).astype(np.uint8)
LEVELS = np.arange(256, dtype=np.uint8)
PALETTE8 = np.stack([LEVELS, 255 - LEVELS, LEVELS * np.uint8(7)], axis=-1)  # a colour map with 256 distinct colours
INK_K = (REF.min(axis=-1) // 2).astype(np.uint8)  # some black ink, so the CMYK rule is exercised

PHOTOMETRICS = ("rgb", "minisblack", "miniswhite", "palette", "separated")
BITS = (8, 16)
PLANAR = ("contig", "separate")
COMPRESSIONS = (None, "lzw", "deflate", "packbits", "zstd", "jpeg")
TILES = (None, (16, 16))
BYTEORDERS = ("<", ">")


def widen(pages8: np.ndarray, bits: int) -> np.ndarray:
    return pages8 if bits == 8 else pages8.astype(np.uint16) * 257


def stored_and_expected(photometric: str, bits: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """What a writer stores for the reference pages in this photometric interpretation, the RGB pixels the file
    means (computed here, not by process.py), and the writer's extra arguments."""
    if photometric == "rgb":
        return widen(REF, bits), REF, {}
    if photometric == "minisblack":
        return widen(GREY, bits), np.repeat(GREY[..., None], 3, -1), {}
    if photometric == "miniswhite":
        return widen(255 - GREY, bits), np.repeat(GREY[..., None], 3, -1), {}
    if photometric == "palette":  # an index per pixel; the TIFF colour map is 16-bit by the standard
        index = GREY if bits == 8 else GREY.astype(np.uint16) * 3
        colormap = np.zeros((3, 1 << bits), np.uint16)
        colormap[:, index.ravel()] = PALETTE8[GREY.ravel()].T.astype(np.uint16) * 257
        return index, PALETTE8[GREY], {"colormap": colormap}
    cmyk = np.concatenate([255 - REF, INK_K[..., None]], axis=-1)  # separated: C, M, Y from RGB, plus K
    rgb = np.floor((255 - cmyk[..., :3].astype(float)) * (255 - cmyk[..., 3:].astype(float)) / 255 + 0.5)
    return widen(cmyk, bits), rgb.astype(np.uint8), {}


def write_tiff(photometric, bits, planar, compression, tile, byteorder) -> bytes:
    stored, _, extra = stored_and_expected(photometric, bits)
    if planar == "separate" and stored.ndim == 4:
        stored = stored.transpose(0, 3, 1, 2)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer, byteorder=byteorder) as tw:
        for page in stored:
            tw.write(
                page,
                photometric=photometric,
                planarconfig=planar,
                compression=compression,
                tile=tile,
                metadata=None,
                **extra,
            )
    return buffer.getvalue()


def writable_cases() -> list[tuple]:
    """The product's combinations tifffile writes, planar layout only where pages have several samples; JPEG at
    8 bits (tifffile stores 16-bit data as 12-bit JPEG: its own case below)."""
    cases = []
    for case in itertools.product(PHOTOMETRICS, BITS, PLANAR, COMPRESSIONS, TILES, BYTEORDERS):
        photometric, planar = case[0], case[2]
        if planar == "separate" and photometric in ("minisblack", "miniswhite", "palette"):
            continue  # one sample per pixel: the two layouts are the same file
        if case[3] == "jpeg" and case[1] == 16:
            continue
        try:
            write_tiff(*case)
        except Exception:  # a combination this writer cannot produce
            continue
        cases.append(case)
    return cases


CASES = writable_cases()


def case_id(case) -> str:
    photometric, bits, planar, compression, tile, byteorder = case
    tiling = "tiles" if tile else "strips"
    return f"{photometric}-{bits}-{planar}-{compression or 'raw'}-{tiling}-{'le' if byteorder == '<' else 'be'}"


def read(tmp_path, data: bytes, name: str = "stack.tiff"):
    path = tmp_path / name
    path.write_bytes(data)
    return read_stack(path)


def assert_refused(tmp_path, data: bytes, *words: str, name: str = "stack.tiff") -> None:
    with pytest.raises(InputError) as refusal:
        read(tmp_path, data, name)
    message = str(refusal.value)
    assert "\n" not in message and name in message, message
    for word in words:
        assert word in message, message


def pillow_decode(data: bytes) -> np.ndarray:
    """libtiff's decode (through Pillow): the codec's own pixels, for JPEG."""
    with Image.open(io.BytesIO(data)) as im:
        pages = []
        for i in range(im.n_frames):
            im.seek(i)
            pages.append(np.asarray(im.convert("RGB")))
    return np.stack(pages)


def tiff_bytes(pages, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pages, metadata=None, **options)
    return buffer.getvalue()


def test_the_matrix_covers_every_axis():
    assert len(CASES) >= 250, len(CASES)
    for axis in range(6):
        assert len({case[axis] for case in CASES}) > 1, axis
    assert any(c[0] == "rgb" and c[1] == 16 and c[2] == "separate" and c[3] is None for c in CASES)
    assert any(c[3] == "jpeg" and c[0] == "rgb" for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_writable_layout_reads_to_the_pixels_it_means(tmp_path, case):
    data = write_tiff(*case)
    stack = read(tmp_path, data)
    got = np.stack(stack.pages)
    assert got.dtype == np.uint8 and got.shape == REF.shape
    if case[3] == "jpeg":  # lossy: equal to the codec's own decode, and near the pixels written
        np.testing.assert_array_equal(got, pillow_decode(data))
        assert np.abs(got.astype(int) - stored_and_expected(case[0], 8)[1]).mean() < 8
    else:
        np.testing.assert_array_equal(got, stored_and_expected(case[0], case[1])[1])


def test_12_bit_jpeg_reads_as_its_codec_decodes_it(tmp_path):
    import imagecodecs

    data = tiff_bytes(np.rint(REF * (4095 / 255)).astype(np.uint16), photometric="rgb", compression="jpeg")
    with tifffile.TiffFile(io.BytesIO(data)) as tif:  # one strip per page: the strip is the whole JPEG stream
        assert tif.pages[0].bitspersample == 12 and len(tif.pages[0].dataoffsets) == 1
        codec = [
            imagecodecs.jpeg_decode(data[p.dataoffsets[0] : p.dataoffsets[0] + p.databytecounts[0]]) for p in tif.pages
        ]
    expected = np.floor(np.stack(codec) * (255 / 4095) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(np.stack(read(tmp_path, data).pages), expected)
    assert np.abs(expected.astype(int) - REF).mean() < 8
