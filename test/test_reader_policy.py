"""The reading policy beyond the conformance matrix: containers and predictors, float and other sample formats,
colour spaces, alpha and bilevel, ImageJ and OME, page roles, repaired and sparse files, page sizes, SimpleITK's TIFF
and .mha, and the issue's three stacks from the organizers' sample answered as its 8-bit RGB stack is."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from conftest import REPO, red_mean_model, run_cli, shared_path
from test_reader_conformance import (
    BITS,
    GREY,
    REF,
    assert_refused,
    pillow_decode,
    read,
    tiff_bytes,
    widen,
)

import reader
from contracts import ANSWER_FILENAME, INPUT_INTERFACE
from reader import InputError, read_stack


@pytest.mark.parametrize(
    "options",
    [
        {"bigtiff": True},
        {"bigtiff": True, "compression": "zstd", "tile": (16, 16)},
        {"compression": "lzw", "predictor": True},
        {"compression": "deflate", "predictor": True, "byteorder": ">"},
        {"compression": "deflate", "predictor": True, "planarconfig": "separate"},
        {"rowsperstrip": 5},
        {"compression": "webp", "compressionargs": {"level": 100, "lossless": True}},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_containers_strips_and_predictors(tmp_path, options):
    pages = REF.transpose(0, 3, 1, 2) if options.get("planarconfig") == "separate" else REF
    for bits in BITS if options.get("compression") != "webp" else (8,):
        stack = read(tmp_path, tiff_bytes(widen(pages, bits), photometric="rgb", **options))
        np.testing.assert_array_equal(np.stack(stack.pages), REF)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_samples_in_0_1_are_scaled(tmp_path, dtype):
    stack = read(tmp_path, tiff_bytes((REF / 255).astype(dtype), photometric="rgb"))
    np.testing.assert_array_equal(np.stack(stack.pages), REF)


@pytest.mark.parametrize(
    ("pages", "words"),
    [
        (REF.astype(np.float32), ("float32 samples must lie in [0, 1]", "found [0, 255]")),
        (np.where(REF > 0, REF / 255, np.nan), ("non-finite",)),
        (REF.astype(np.int16), ("signed int16 samples are not supported",)),
        (REF.astype(np.int8) // 2, ("signed int8 samples are not supported",)),
        (REF.astype(np.complex64), ("complex64 samples are not supported",)),
    ],
    ids=["float-0-255", "float-nan", "int16", "int8", "complex64"],
)
def test_other_sample_formats_are_refused_by_name(tmp_path, pages, words):
    assert_refused(tmp_path, tiff_bytes(pages, photometric="rgb"), *words)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"photometric": "cielab"}, ("photometric interpretation CIELAB is not supported",)),
        ({"photometric": "ycbcr"}, ("YCbCr pixels without JPEG compression",)),
    ],
    ids=["cielab", "ycbcr-raw"],
)
def test_other_colour_spaces_are_refused_by_name(tmp_path, options, words):
    assert_refused(tmp_path, tiff_bytes(REF, **options), *words)


@pytest.mark.parametrize("bits", [1, 8, 16])
def test_extra_samples_and_bilevel(tmp_path, bits):
    alpha = np.full((*REF.shape[:-1], 1), 77, np.uint8)
    rgba = read(
        tmp_path,
        tiff_bytes(
            widen(np.concatenate([REF, alpha], -1), 16 if bits == 16 else 8),
            photometric="rgb",
            extrasamples=["unassalpha"],
        ),
    )
    np.testing.assert_array_equal(np.stack(rgba.pages), REF)
    grey_alpha = np.concatenate([GREY[..., None], alpha], -1)
    la = read(
        tmp_path,
        tiff_bytes(
            widen(grey_alpha, 16 if bits == 16 else 8),
            photometric="minisblack",
            planarconfig="contig",
            extrasamples=["assocalpha"],
        ),
    )
    np.testing.assert_array_equal(np.stack(la.pages), np.repeat(GREY[..., None], 3, -1))
    if bits == 1:
        bilevel = GREY > 127
        stack = read(tmp_path, tiff_bytes(bilevel, photometric="minisblack"))
        np.testing.assert_array_equal(np.stack(stack.pages)[..., 0], bilevel * 255)


def test_imagej_and_ome_stacks(tmp_path):
    imagej = read(tmp_path, tiff_bytes(REF, imagej=True, photometric="rgb"), "imagej.tif")
    np.testing.assert_array_equal(np.stack(imagej.pages), REF)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer, ome=True) as tw:  # each figure with a reduced level in SubIFDs
        for page in REF:
            tw.write(page, photometric="rgb", subifds=1)
            tw.write(page[::2, ::2], photometric="rgb", subfiletype=1)
    ome = read(tmp_path, buffer.getvalue(), "stack.ome.tiff")
    np.testing.assert_array_equal(np.stack(ome.pages), REF)


@pytest.mark.parametrize(
    ("subfiletype", "role"),
    [
        (1, "reduced-resolution overview"),
        (4, "transparency mask"),
        (5, "reduced-resolution overview and a transparency mask"),
    ],
)
def test_pages_that_are_not_figures_are_skipped_with_a_warning(tmp_path, caplog, subfiletype, role):
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tw:
        tw.write(REF[0], photometric="rgb")
        tw.write(
            REF[0, ::2, ::2, 0] > 0 if subfiletype & 4 else REF[0, ::2, ::2],
            subfiletype=subfiletype,
            photometric="minisblack" if subfiletype & 4 else "rgb",
        )
        tw.write(REF[1], photometric="rgb")
    stack = read(tmp_path, buffer.getvalue())
    np.testing.assert_array_equal(np.stack(stack.pages), REF)
    assert f"page 2 is a {role}" in caplog.text


def test_the_old_subfiletype_tag_is_honoured(tmp_path):
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tw:
        tw.write(REF[0], photometric="rgb")
        tw.write(REF[1, ::2, ::2], photometric="rgb", extratags=[(255, "H", 1, 2, True)])  # SubfileType 2: reduced
    np.testing.assert_array_equal(np.stack(read(tmp_path, buffer.getvalue()).pages), REF[:1])


def test_a_stack_of_overviews_only_is_refused(tmp_path):
    assert_refused(tmp_path, tiff_bytes(REF[0], photometric="rgb", subfiletype=1), "no figure pages")


def test_a_tiff_tifffile_had_to_repair_is_refused(tmp_path):
    data = bytearray(tiff_bytes(REF, photometric="rgb"))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:  # page 1's next-IFD offset: past the end of the file
        first = tif.pages[0]
        at = first.offset + 2 + 12 * len(first.tags)
    data[at : at + 4] = (len(data) + 64).to_bytes(4, "little")
    assert_refused(tmp_path, bytes(data), "damaged TIFF")


def test_a_sparse_strip_is_refused_not_zero_filled(tmp_path):
    data = bytearray(tiff_bytes(REF[:1], photometric="rgb", rowsperstrip=8))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tag = tif.pages[0].tags[279]  # StripByteCounts, LONG each
        at = tag.valueoffset
    data[at + 4 : at + 8] = (0).to_bytes(4, "little")  # the second strip: no bytes
    assert_refused(tmp_path, bytes(data), "no data")


@pytest.mark.parametrize("side", [16, 300])
def test_a_page_far_from_128_is_warned_about(tmp_path, caplog, side):
    read(tmp_path, tiff_bytes(np.zeros((side, side, 3), np.uint8), photometric="rgb"))
    assert f"{side}x{side} far from the challenge's 128x128" in caplog.text


@pytest.mark.parametrize(
    ("pixels", "expected"),
    [
        (widen(REF, 8), REF),
        (widen(REF, 16), REF),
        (widen(GREY, 8), np.repeat(GREY[..., None], 3, -1)),
        (widen(GREY, 16), np.repeat(GREY[..., None], 3, -1)),
        ((REF / 255).astype(np.float32), REF),
    ],
    ids=["rgb8", "rgb16", "grey8", "grey16", "float32"],
)
@pytest.mark.parametrize("fmt", ["mha", "tiff"])
def test_simpleitk_files_follow_the_same_policy(tmp_path, pixels, expected, fmt):
    path = tmp_path / f"stack.{fmt}"
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 4), str(path))
    np.testing.assert_array_equal(np.stack(read_stack(path).pages), expected)


@pytest.mark.parametrize(
    ("pixels", "words"),
    [
        (REF.astype(np.int16), ("signed int16 samples are not supported",)),
        (REF.astype(np.float64), ("float64 samples must lie in [0, 1]",)),
        (np.concatenate([REF, REF[..., :1]], -1), ("expected 1 (grey) or 3 (RGB) components",)),
    ],
    ids=["int16", "float64-0-255", "4-components"],
)
def test_simpleitk_mha_refusals_match_tiffs(tmp_path, pixels, words):
    path = tmp_path / "stack.mha"
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path))
    with pytest.raises(InputError) as refusal:
        read_stack(path)
    assert "\n" not in str(refusal.value) and all(w in str(refusal.value) for w in words), refusal.value


# The issue's three stacks, written from the organizers' sample pages, answered by process.py as the 8-bit stack is.


@pytest.fixture(scope="module")
def sample_pages() -> np.ndarray:
    """The organizers' 16 pages, decoded by libtiff (through Pillow), not by the reader under test."""
    return pillow_decode(shared_path("gc-sample", "input", "images", INPUT_INTERFACE, "stack_5.tiff").read_bytes())


def answer(tmp_path, model_dir, write) -> tuple[list[dict], str]:
    folder = tmp_path / "in" / "images" / INPUT_INTERFACE
    folder.mkdir(parents=True)
    write(folder / "stack.tiff")
    result = run_cli(
        REPO / "process.py",
        "--input",
        tmp_path / "in",
        "--output",
        tmp_path / "out",
        "--model",
        model_dir,
        "--device",
        "cpu",
    )
    return json.loads((tmp_path / "out" / ANSWER_FILENAME).read_text()), result.stderr


def test_the_issues_stacks_get_the_8_bit_stacks_answer(sample_pages, tmp_path):
    ref = sample_pages
    grey = np.rint(ref @ [0.299, 0.587, 0.114]).astype(np.uint8)
    model = red_mean_model(tmp_path / "model")  # each page answered by its mean red: no training needed

    def overview(p):
        with tifffile.TiffWriter(p) as tw:
            for page in ref:
                tw.write(page, photometric="rgb")
            tw.write(ref[0, ::2, ::2], photometric="rgb", subfiletype=1)

    expected, _ = answer(tmp_path / "rgb8", model, lambda p: tifffile.imwrite(p, ref, photometric="rgb"))
    planes16 = (ref.astype(np.uint16) * 257).transpose(0, 3, 1, 2)
    planar16, _ = answer(
        tmp_path / "planar16",
        model,
        lambda p: tifffile.imwrite(p, planes16, photometric="rgb", planarconfig="separate"),
    )
    with_overview, log = answer(tmp_path / "overview", model, overview)
    assert len(expected) == 16 and planar16 == expected and with_overview == expected
    assert "page 17 is a reduced-resolution overview" in log
    grey8, _ = answer(
        tmp_path / "grey8", model, lambda p: tifffile.imwrite(p, np.repeat(grey[..., None], 3, -1), photometric="rgb")
    )
    grey16, log = answer(
        tmp_path / "grey16",
        model,
        lambda p: tifffile.imwrite(p, grey.astype(np.uint16) * 257, photometric="minisblack"),
    )
    assert grey16 == grey8 and "16 of 16 page(s) are grey" in log


def test_the_sample_reads_as_libtiff_decodes_it(sample_pages):
    case = reader.read_stack(shared_path("gc-sample", "input", "images", INPUT_INTERFACE, "stack_5.tiff"))
    np.testing.assert_array_equal(np.stack(case.pages), sample_pages)


def test_samples_are_scaled_by_the_range_the_file_states(tmp_path):
    """A 12-bit camera's values in 16-bit samples, MaxSampleValue 4095: read by that range, not 16x too dark."""
    values = np.random.default_rng(0).integers(0, 4096, (16, 16, 3), np.uint16)
    data = tiff_bytes(values[None], photometric="rgb", extratags=[(281, 3, 1, 4095, True)])
    expected = np.floor(values.astype(np.float64) * 255 / 4095 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(read(tmp_path, data).pages[0], expected)
    values[0, 0, 0] = 4096
    data = tiff_bytes(values[None], photometric="rgb", extratags=[(281, 3, 1, 4095, True)])
    assert_refused(tmp_path, data, "samples exceed their stated range 0-4095")
