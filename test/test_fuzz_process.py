"""The container fuzzed as a whole process: the organizers' real sample stack and an .mha, mutated where a careless
writer or an attacker would (next-IFD pointers, tag counts and values, .mha header fields), each mutant answered by
``process.py`` in a child under a memory limit and a wall-clock limit.

For every mutant: exit 0 with a valid answer, or exit 2 with one line; never a traceback, never a hang, never a
byte read from outside the input folder (the mutants point at a FIFO outside it: opening it would hang the child
until the wall-clock limit). ``FUZZ_EXAMPLES`` sets the number of mutants per seed (``make fuzz``: 300), and
``FUZZ_REPORT`` names a JSON file for the outcomes (exit codes and refusal reasons, counted, and the time).
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import PROCESS, red_mean_model, shared_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import ANSWER_FILENAME, INPUT_INTERFACE

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
MEMORY_LIMIT = 6 << 30  # bytes of address space for the child: a decoded bomb would cross it
WALL_LIMIT = 60  # seconds per mutant
INTERESTING = (0, 1, 2, 3, 8, 16, 127, 128, 255, 4096, 65535, 0x7FFFFFFF, 0xFFFFFFFF)
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)


def ifds(data: bytes) -> list[tuple[int, int]]:
    """(offset, entry count) of each IFD of a little-endian classic TIFF's main chain."""
    out, offset = [], struct.unpack_from("<I", data, 4)[0]
    while offset and len(out) < 64:
        count = struct.unpack_from("<H", data, offset)[0]
        out.append((offset, count))
        offset = struct.unpack_from("<I", data, offset + 2 + 12 * count)[0]
    return out


tiff_mutation = st.one_of(
    st.tuples(st.just("next"), st.integers(0, 15), st.sampled_from(["self", "first", "past", "zero", "middle"])),
    st.tuples(st.just("value"), st.integers(0, 15), st.integers(0, 20), st.sampled_from(INTERESTING)),
    st.tuples(st.just("count"), st.integers(0, 15), st.integers(0, 20), st.sampled_from(INTERESTING)),
    st.tuples(st.just("type"), st.integers(0, 15), st.integers(0, 20), st.integers(0, 18)),
)


def mutate_tiff(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    chain = ifds(data)
    for kind, page, *rest in mutations:
        offset, count = chain[page % len(chain)]
        if kind == "next":
            targets = {"self": offset, "first": chain[0][0], "past": len(out) + 8, "zero": 0, "middle": len(out) // 2}
            struct.pack_into("<I", out, offset + 2 + 12 * count, targets[rest[0]])
            continue
        entry = offset + 2 + 12 * (rest[0] % count)
        if kind == "value":
            struct.pack_into("<I", out, entry + 8, rest[1])
        elif kind == "count":
            struct.pack_into("<I", out, entry + 4, rest[1])
        else:
            struct.pack_into("<H", out, entry + 2, rest[1])
    return bytes(out)


mha_mutation = st.one_of(
    st.tuples(st.just("DimSize"), st.sampled_from(["16 16 0", "0 16 2", "1 1 2", "12000 12000 16", "16 16 300"])),
    st.tuples(st.just("ElementDataFile"), st.sampled_from(["CANARY", "../canary", "LIST", "stack.raw", "LOCAL"])),
    st.tuples(st.just("ElementType"), st.sampled_from(["MET_UCHAR", "MET_FLOAT", "MET_SHORT", "MET_NONE", "x"])),
    st.tuples(st.just("ElementNumberOfChannels"), st.sampled_from(["0", "1", "3", "4", "65535"])),
    st.tuples(st.just("NDims"), st.sampled_from(["1", "2", "3", "4", "9"])),
    st.tuples(st.just("CompressedData"), st.sampled_from(["True", "False"])),
)


def mutate_mha(data: bytes, mutations, canary: str) -> bytes:
    head, _, pixels = data.partition(b"ElementDataFile = LOCAL\n")
    fields = dict(line.split(" = ", 1) for line in head.decode().splitlines())
    for key, value in mutations:
        fields[key] = canary if value == "CANARY" else value
    data_file = fields.pop("ElementDataFile", "LOCAL")
    text = "".join(f"{k} = {v}\n" for k, v in fields.items()) + f"ElementDataFile = {data_file}\n"
    return text.encode() + pixels


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def serve(root, name: str, data: bytes, model) -> tuple[int, list[str], list | None]:
    """process.py on a case holding ``data`` as ``name``: (exit code, stderr lines, answer or None)."""
    case = root / "case"
    folder = case / "images" / INPUT_INTERFACE
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    (folder / name).write_bytes(data)
    (folder / "stack.raw").write_bytes(bytes(16 * 16 * 2 * 3))  # a legal sibling the header may name
    out = root / "out"
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, str(PROCESS), "--input", str(case), "--output", str(out), "--model", str(model)],
            capture_output=True,
            text=True,
            timeout=WALL_LIMIT,
            preexec_fn=limited,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer within {WALL_LIMIT} s (a hang, or a read of the FIFO outside the input)")
    assert time.monotonic() - started < WALL_LIMIT
    answer = json.loads((out / ANSWER_FILENAME).read_text()) if result.returncode == 0 else None
    return result.returncode, result.stderr.splitlines(), answer


OUTCOMES: Counter = Counter()


def check(code: int, lines: list[str], answer) -> None:
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert code in (0, 2), "\n".join(lines)
    if code == 0:
        assert answer and all(0 <= e["confidence"] <= 1 for e in answer)
    else:
        errors = [line for line in lines if line.startswith("ERROR")]
        assert len(errors) == 1 and "MemoryError" not in errors[0], "\n".join(lines)
    reason = "answered" if code == 0 else errors[0].split(": ", 1)[-1].split(" (")[0][:60]
    OUTCOMES[f"exit {code}: {reason}"] += 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model, a work folder, and a FIFO outside the input folder that no mutant may open."""
    root = tmp_path_factory.mktemp("fuzz")
    os.mkfifo(root / "canary")
    started = time.monotonic()
    yield {"root": root, "model": red_mean_model(root / "model"), "canary": str(root / "canary")}
    if report := os.environ.get("FUZZ_REPORT"):
        seconds = round(time.monotonic() - started)
        mutants = sum(OUTCOMES.values())
        summary = {"mutants": mutants, "seconds": seconds, "outcomes": dict(OUTCOMES.most_common())}
        Path(report).write_text(json.dumps(summary, indent=1) + "\n")


@given(mutations=st.lists(tiff_mutation, min_size=1, max_size=3))
@SETTINGS
def test_the_sample_stack_mutated(world, mutations):
    sample = shared_path("gc-sample", "input", "images", INPUT_INTERFACE, "stack_5.tiff").read_bytes()
    check(*serve(world["root"], "stack.tiff", mutate_tiff(sample, mutations), world["model"]))


@given(mutations=st.lists(mha_mutation, min_size=1, max_size=3))
@SETTINGS
def test_an_mha_header_mutated(world, mutations, tmp_path_factory):
    import SimpleITK as sitk

    seed = tmp_path_factory.getbasetemp() / "seed.mha"
    if not seed.exists():
        pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(seed))
    data = mutate_mha(seed.read_bytes(), mutations, world["canary"])
    check(*serve(world["root"], "stack.mha", data, world["model"]))
