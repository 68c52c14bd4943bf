"""The input folder is the boundary, and a header's promises are checked before anything is decoded: an .mha whose
data lies elsewhere (an absolute path, ``..``, a symlink out, a FIFO) is refused without reading a byte of it;
zero-sized and oversized declarations are refused from the header alone."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from conftest import PROCESS, assert_clean_failure, red_mean_model, run_cli

from contracts import INPUT_INTERFACE
from reader import InputError, read_stack

CANARY = b"canary bytes outside the input folder " * 1000


@pytest.fixture
def case(tmp_path):
    """A case folder with a legal 2-page RGB .mha whose data is LOCAL; returns its stack folder."""
    import SimpleITK as sitk

    folder = tmp_path / "in" / "images" / INPUT_INTERFACE
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(folder / "stack.mha"))
    (tmp_path / "outside.raw").write_bytes(CANARY)
    return folder


def with_header(path, **fields) -> None:
    """Rewrite the .mha's header fields (the data, after ElementDataFile, kept as it is)."""
    raw = path.read_bytes()
    head, _, data = raw.partition(b"ElementDataFile = LOCAL\n")
    lines = dict(line.split(" = ", 1) for line in head.decode().splitlines())
    lines.update(fields)
    data_file = lines.pop("ElementDataFile", "LOCAL")
    text = "".join(f"{k} = {v}\n" for k, v in lines.items()) + f"ElementDataFile = {data_file}\n"
    path.write_bytes(text.encode() + (data if data_file == "LOCAL" else b""))


def test_a_legal_mha_is_read(case):
    stack = read_stack(case / "stack.mha")
    assert len(stack.pages) == 2 and stack.pages[0].shape == (16, 16, 3)


@pytest.mark.parametrize(
    "where", ["ABSOLUTE", "../../outside.raw", "sub/outside.raw", "LIST", "stack%03d.raw 1 2 1", "link.raw", "fifo"]
)
def test_data_outside_the_file_and_its_folder_is_refused(case, where, tmp_path):
    if where == "ABSOLUTE":
        where = str(tmp_path / "outside.raw")
    if where == "link.raw":
        (case / "link.raw").symlink_to(tmp_path / "outside.raw")
    if where == "fifo":
        os.mkfifo(case / "fifo")  # reading it would hang the container forever
    with_header(case / "stack.mha", ElementDataFile=where)
    started = time.monotonic()
    with pytest.raises(InputError, match="not in the file itself nor a regular file beside it: refused"):
        read_stack(case / "stack.mha")
    assert time.monotonic() - started < 5


def test_data_in_a_regular_file_beside_the_stack_is_read(case):
    raw = read_stack(case / "stack.mha").pages
    header, _, data = (case / "stack.mha").read_bytes().partition(b"ElementDataFile = LOCAL\n")
    (case / "stack.raw").write_bytes(data)
    (case / "stack.mha").write_bytes(header + b"ElementDataFile = stack.raw\n")
    assert all(np.array_equal(a, b) for a, b in zip(read_stack(case / "stack.mha").pages, raw, strict=True))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"DimSize": "16 0 2"}, "a dimension of size 0"),
        ({"DimSize": "12000 12000 16"}, "declared size too large"),
        ({"DimSize": "16 16 300"}, "declared size too large (300 page(s)"),
        ({"DimSize": "4096 4096 60", "ElementType": "MET_DOUBLE"}, "declares more than 1024 MiB"),
        ({"DimSize": "16 x 2"}, "not a list of integers"),
    ],
)
def test_declared_sizes_are_refused_from_the_header_alone(case, fields, words):
    with_header(case / "stack.mha", **fields)
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_stack(case / "stack.mha")


def test_the_container_refuses_data_elsewhere_in_one_line(case, tmp_path):
    model_dir = red_mean_model(tmp_path / "model")
    with_header(case / "stack.mha", ElementDataFile="/etc/passwd")
    result = run_cli(
        PROCESS, "--input", tmp_path / "in", "--output", tmp_path / "out", "--model", model_dir, check=False
    )
    assert result.returncode == 2
    assert_clean_failure(result, tmp_path / "out", "stack.mha", "'/etc/passwd'", "refused")


def tiff_with(tmp_path, pages: np.ndarray, patch=None):
    """A multi-page RGB TIFF of ``pages``; ``patch(data, offsets)`` edits its bytes (offsets: each IFD's)."""
    import struct

    import tifffile

    path = tmp_path / "stack.tiff"
    tifffile.imwrite(path, pages, photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        offsets = [(p.offset, len(p.tags)) for p in tif.pages]
    data = bytearray(path.read_bytes())
    if patch is not None:
        patch(data, offsets, struct)
    path.write_bytes(bytes(data))
    return path


def _next_ifd(data, offsets, struct, page, target):
    offset, n = offsets[page]
    struct.pack_into("<I", data, offset + 2 + 12 * n, target)


@pytest.mark.parametrize("back_to", [0, 2], ids=["an-earlier-page", "itself"])
def test_an_ifd_chain_that_loops_is_refused_at_once(tmp_path, back_to):
    pages = np.zeros((3, 16, 16, 3), np.uint8)
    path = tiff_with(tmp_path, pages, lambda d, o, s: _next_ifd(d, o, s, 2, o[back_to][0]))
    started = time.monotonic()
    with pytest.raises(InputError, match="loops back to an earlier page"):
        read_stack(path)
    assert time.monotonic() - started < 5


def test_declared_tiff_sizes_are_refused_before_decoding(tmp_path):
    with pytest.raises(InputError, match="more than 64 pages"):
        read_stack(tiff_with(tmp_path, np.zeros((65, 4, 4, 3), np.uint8)))

    def width(value):
        def patch(data, offsets, struct):
            offset, n = offsets[0]
            for entry in range(offset + 2, offset + 2 + 12 * n, 12):
                if struct.unpack_from("<H", data, entry)[0] in (256, 257):  # ImageWidth, ImageLength: inline
                    kind = struct.unpack_from("<H", data, entry + 2)[0]
                    struct.pack_into("<H" if kind == 3 else "<I", data, entry + 8, value)

        return patch

    with pytest.raises(InputError, match="a side of 0 pixels"):  # both sides 0
        read_stack(tiff_with(tmp_path, np.zeros((1, 16, 16, 3), np.uint8), width(0)))
    with pytest.raises(InputError, match=r"declared size too large \(60000x60000"):
        read_stack(tiff_with(tmp_path, np.zeros((1, 16, 16, 3), np.uint8), width(60000)))


def test_a_stack_linked_from_outside_the_input_is_refused(tmp_path):
    model_dir = red_mean_model(tmp_path / "model")
    folder = tmp_path / "in" / "images" / INPUT_INTERFACE
    folder.mkdir(parents=True)
    (tmp_path / "elsewhere.tiff").write_bytes(b"II*\0")
    (folder / "stack.tiff").symlink_to(tmp_path / "elsewhere.tiff")
    result = run_cli(
        PROCESS, "--input", tmp_path / "in", "--output", tmp_path / "out", "--model", model_dir, check=False
    )
    assert result.returncode == 2
    assert_clean_failure(result, tmp_path / "out", "stack.tiff", "outside the input folder")


def test_an_input_path_longer_than_the_system_allows(tmp_path):
    model_dir = red_mean_model(tmp_path / "model")
    too_long = tmp_path / ("x/" * 2100)
    result = run_cli(PROCESS, "--input", too_long, "--output", tmp_path / "out", "--model", model_dir, check=False)
    assert result.returncode == 2
    assert_clean_failure(result, tmp_path / "out", "File name too long")
    assert len(result.stderr.splitlines()[-1]) < 400


@pytest.mark.parametrize("shape", [(1, 40, 3), (40, 1, 3), (1, 1, 3)])
def test_a_one_pixel_side_is_resampled_without_a_crash(shape):
    from contracts import resample_to_pixel_size

    page = np.full(shape, 9, np.uint8)
    out = resample_to_pixel_size(page, 0.25, 0.23)
    assert out.shape == shape and (out == 9).all()


@pytest.mark.parametrize("codec", ["jpeg", "jpeg2000", "jpeg-with-70-kib-before-its-frame"])
def test_a_strip_whose_codestream_declares_more_than_its_page_is_refused_undecoded(tmp_path, codec):
    import struct

    import imagecodecs
    import tifffile

    page = np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8)
    path = tmp_path / "stack.tiff"
    tifffile.imwrite(path, page, photometric="rgb", compression=codec.split("-")[0], rowsperstrip=128)
    assert read_stack(path).pages[0].shape == (128, 128, 3)  # the legal stack is read
    big = np.zeros((3000, 2000, 3), np.uint8)
    stream = (
        imagecodecs.jpeg2k_encode(big, level=10) if codec == "jpeg2000" else imagecodecs.jpeg8_encode(big, level=50)
    )
    if codec.endswith("frame"):  # application segments of 70 KiB between SOI and the frame header
        padding = b"".join(b"\xff\xe1" + struct.pack(">H", 35000) + bytes(34998) for _ in range(2))
        stream = stream[:2] + padding + stream[2:]
    with tifffile.TiffFile(path) as tif:
        tags = {tag.code: tag for tag in tif.pages[0].tags}
        offsets_at, counts_at = tags[273].valueoffset, tags[279].valueoffset
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offsets_at, len(data))
    struct.pack_into("<I", data, counts_at, len(stream))
    path.write_bytes(bytes(data) + stream)
    with pytest.raises(InputError, match="strip 1 declares 2000x3000 pixels, the page holds 128x128: refused"):
        read_stack(path)


def test_an_mha_under_a_name_that_is_not_utf8_is_answered(case, tmp_path):
    model_dir = red_mean_model(tmp_path / "model")
    """SimpleITK aborts the whole process on such a name; the reader hands it the open file instead."""
    os.rename(case / "stack.mha", os.fsencode(case) + b"/st\xffack.mha")
    result = run_cli(
        PROCESS, "--input", tmp_path / "in", "--output", tmp_path / "out", "--model", model_dir, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "st\\udcffack.mha" in result.stderr and "Logging error" not in result.stderr
    assert len(json.loads((tmp_path / "out" / "multiple-mitotic-figure-classification.json").read_text())) == 2
