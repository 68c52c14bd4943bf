"""Fuzzing the stack reader: thousands of mutated TIFFs, each read and answered or refused with InputError.

A mutation that the reader accepts must give RGB uint8 pages that the model answers validly; anything else must
be an ``InputError`` (process.py's one-line, non-zero exit). Any other exception is a bug.
"""

import io
import struct

import numpy as np
import pytest
from conftest import red_mean_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from contracts import build_answer, validate_answer
from process import OnnxEnsemble
from reader import InputError, read_stack


def _tiff(pages: list[Image.Image], **options) -> bytes:
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:], **options)
    return buffer.getvalue()


def _seed_corpus() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for s in (16, 24, 16)]
    return [
        _tiff(rgb, compression="raw"),
        _tiff(rgb, compression="raw", dpi=(102_351, 101_949)),  # a resolution, as the organizers' stacks record
        _tiff(rgb, compression="tiff_lzw"),
        _tiff(rgb, compression="tiff_adobe_deflate"),
        _tiff(rgb, compression="packbits"),
        _tiff(rgb[:1], compression="jpeg"),
        _tiff([rgb[0].convert("P"), rgb[1].convert("L"), rgb[2].convert("RGBA")]),
    ]


SEEDS = _seed_corpus()
INTERESTING = (0, 1, 3, 128, 255, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("word"), st.integers(0, 600), st.sampled_from(INTERESTING)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.integers(0, 255)),
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, position, value in mutations:
        if not out:
            break
        at = position % len(out)
        if kind == "flip":
            out[at] ^= value
        elif kind == "word" and at + 4 <= len(out):  # header and IFD fields: offsets, counts, sizes
            struct.pack_into("<I", out, at, value)
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value]) * 7
    return bytes(out)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    return OnnxEnsemble(red_mean_model(tmp_path_factory.mktemp("fuzz") / "model", pixel_size_um=0.23), "cpu")


@pytest.fixture(scope="module")
def outcomes():
    return {"answered": 0, "refused": 0}


@settings(max_examples=3000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, len(SEEDS) - 1), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_every_mutated_tiff_is_answered_or_refused_cleanly(ensemble, outcomes, tmp_path_factory, seed, mutations):
    path = tmp_path_factory.getbasetemp() / "fuzz-case.tiff"
    path.write_bytes(mutate(SEEDS[seed], mutations))
    try:
        case = read_stack(path)
    except InputError as err:
        assert path.name in str(err)
        outcomes["refused"] += 1
        return
    pages = case.pages
    assert pages and all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 and p.size for p in pages)
    assert len(case.pixel_sizes_um) == len(pages)
    answer = build_answer(ensemble.predict(pages, pixel_sizes_um=case.pixel_sizes_um), ensemble.manifest.threshold)
    validate_answer(answer, len(pages))
    outcomes["answered"] += 1


def test_the_fuzzer_reached_both_outcomes(outcomes):
    """Runs after the fuzz test: a fuzzer that only ever failed (or never did) would test one path."""
    assert outcomes["answered"] > 100 and outcomes["refused"] > 100, outcomes
