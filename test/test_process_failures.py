"""process.py's failures: each bad input, model folder, output folder or device refused with one line on stderr, its
exit code, and no answer file."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import PROCESS, REPO, assert_clean_failure, case_with_file, run_cli
from PIL import Image

import process
from contracts import ANSWER_FILENAME, INPUT_INTERFACE, sha256_of
from training.synthetic import write_case


def run_on_the_sample(out_dir, model_dir, *options) -> subprocess.CompletedProcess:
    """process.py on the committed sample case, whatever its exit code."""
    return run_cli(
        PROCESS, "--input", REPO / "test" / "input", "--output", out_dir, "--model", model_dir, *options, check=False
    )


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("empty.tiff", b"", ("empty.tiff", "empty file")),
        ("notes.tif", b"this is not an image at all", ("notes.tif", "unreadable")),
        ("stack.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 9 9\n", ("stack.mha",)),
        ("readme.txt", b"no image here", ("no .tif, .tiff or .mha",)),
    ],
)
def test_bad_files_fail_cleanly(model_dir, tmp_path, name, content, words):
    case = case_with_file(tmp_path, name, content)
    result = run_cli(PROCESS, "--input", case, "--output", tmp_path / "out", "--model", model_dir, check=False)
    assert_clean_failure(result, tmp_path / "out", *words)


def test_truncated_tiff_fails_cleanly(model_dir, pages, tmp_path):
    path = write_case(tmp_path / "full", pages[:4])
    case = case_with_file(tmp_path, "cut.tiff", path.read_bytes()[: path.stat().st_size // 3])
    result = run_cli(PROCESS, "--input", case, "--output", tmp_path / "out", "--model", model_dir, check=False)
    assert_clean_failure(result, tmp_path / "out", "cut.tiff")


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ("nowhere", ("nowhere: no such folder", "--input is a case folder holding images/stacked-")),
        ("a_page.png", ("a_page.png: not a folder", "--input is a case folder holding images/stacked-")),
        ("empty_case", ("empty_case/images/stacked-histopathology-roi-cropouts: no such folder (a case folder",)),
    ],
)
def test_an_input_that_is_not_a_case_folder_says_what_input_must_hold(model_dir, tmp_path, given, words):
    (tmp_path / "a_page.png").write_bytes(b"png")
    (tmp_path / "empty_case").mkdir()
    result = run_cli(
        PROCESS, "--input", tmp_path / given, "--output", tmp_path / "out", "--model", model_dir, check=False
    )
    assert result.returncode == 2
    assert_clean_failure(result, tmp_path / "out", *words)


def test_a_missing_model_names_the_command_that_makes_one(tmp_path):
    result = run_on_the_sample(tmp_path / "out", tmp_path / "no_model", "--device", "cpu")
    assert result.returncode == 4
    assert_clean_failure(result, tmp_path / "out", "no manifest", "python -m training export RUN --output", "make demo")


def test_on_a_host_the_default_model_folder_is_not_called_baked_into_the_image(tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr(process, "GC_MODEL_DIR", tmp_path / "no_tarball")
    monkeypatch.setattr(process.log, "info", lambda msg, *args: messages.append(msg % args))
    assert process.resolve_model_dir(None) == process.BAKED_MODEL_DIR
    assert "beside process.py (no --model given)" in messages[0] and "baked into the image" not in messages[0]


def test_tampered_model_fails_cleanly(model_dir, tmp_path):
    tampered = shutil.copytree(model_dir, tmp_path / "model")
    onnx_path = tampered / "ensemble.int8.onnx"  # the graph the CPU serves
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    result = run_on_the_sample(tmp_path / "out", tampered, "--device", "cpu")
    assert result.returncode == 4
    assert_clean_failure(result, tmp_path / "out", "ensemble.int8.onnx", "sha256")


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available(),
    reason="a GPU is present: the CUDA provider would load",
)
def test_device_cuda_never_falls_back_to_cpu_silently(model_dir, tmp_path):
    result = run_on_the_sample(tmp_path / "out", model_dir, "--device", "cuda")
    assert_clean_failure(result, tmp_path / "out", "device cuda")


def test_a_failed_run_leaves_no_earlier_answer_behind(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ANSWER_FILENAME).write_text("[]")
    case = case_with_file(tmp_path, "empty.tiff", b"")
    result = run_cli(PROCESS, "--input", case, "--output", out, "--model", model_dir, check=False)
    assert_clean_failure(result, out, "empty.tiff")


def tiff_with_declared_size(path, width: int, height: int) -> None:
    """A valid one-page 128 px TIFF whose header then claims width x height (LONG ImageWidth/ImageLength)."""
    import struct

    Image.new("RGB", (128, 128)).save(path, compression="raw")
    data = bytearray(path.read_bytes())
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", data, entry, tag, 4, 1, width if tag == 256 else height)
    path.write_bytes(bytes(data))


def test_decompression_bomb_is_refused_before_decoding(model_dir, tmp_path):
    case = case_with_file(tmp_path, "placeholder", b"")
    tiff_with_declared_size(case / "images" / INPUT_INTERFACE / "bomb.tiff", 100_000, 100_000)
    result = run_cli(PROCESS, "--input", case, "--output", tmp_path / "out", "--model", model_dir, check=False)
    assert_clean_failure(result, tmp_path / "out", "bomb.tiff", "too large")


@pytest.mark.parametrize("damage", ["not json", "missing key", "wrong threshold type"])
def test_a_manifest_that_does_not_parse_fails_cleanly(model_dir, tmp_path, damage):
    broken = shutil.copytree(model_dir, tmp_path / "model")
    manifest = json.loads((broken / "manifest.json").read_text())
    if damage == "missing key":
        del manifest["graphs"]
    elif damage == "wrong threshold type":
        manifest["threshold"] = "half"
    text = "{" if damage == "not json" else json.dumps(manifest)
    (broken / "manifest.json").write_text(text)
    result = run_cli(
        PROCESS, "--input", REPO / "test" / "input", "--output", tmp_path / "out", "--model", broken, check=False
    )
    assert_clean_failure(result, tmp_path / "out", "manifest")


def test_a_damaged_compressed_tiff_fails_in_one_line_quoting_the_codec(model_dir, tmp_path):
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(
        buffer, format="TIFF", compression="tiff_adobe_deflate"
    )
    data = bytearray(buffer.getvalue())
    data[200:260] = bytes(b ^ 0x55 for b in data[200:260])  # inside the deflate stream
    case = case_with_file(tmp_path, "damaged.tiff", bytes(data))
    result = run_cli(PROCESS, "--input", case, "--output", tmp_path / "out", "--model", model_dir, check=False)
    assert_clean_failure(result, tmp_path / "out", "damaged.tiff", "unreadable", "DeflateError")


def test_each_class_of_failure_has_its_exit_code(model_dir, tmp_path):
    """process.py's docstring: 2 input, 3 output folder, 4 model folder (5, the device: above, when no GPU)."""
    sample = REPO / "test" / "input"
    bad_input = case_with_file(tmp_path / "a", "notes.tif", b"not an image")
    tampered = shutil.copytree(model_dir, tmp_path / "model")
    (tampered / "manifest.json").write_text("{")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args, code in [
        ((bad_input, tmp_path / "o1", model_dir), 2),
        ((sample, blocker / "out", model_dir), 3),  # the output folder would be inside a file
        ((sample, tmp_path / "o3", tampered), 4),
    ]:
        result = run_cli(
            PROCESS, "--input", args[0], "--output", args[1], "--model", args[2], "--device", "cpu", check=False
        )
        assert result.returncode == code, (code, result.stderr)
        assert len([line for line in result.stderr.splitlines() if line.startswith("ERROR")]) == 1


def test_an_unwritable_output_folder_fails_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli(
        PROCESS,
        "--input",
        REPO / "test" / "input",
        "--output",
        blocker / "out",
        "--model",
        tmp_path / "no-model",
        "--device",
        "cpu",
        check=False,
    )
    assert result.returncode == 3 and "output folder not writable" in result.stderr, result.stderr
    assert "no manifest" not in result.stderr and "read " not in result.stderr  # neither the model nor the stack


def test_an_unreadable_input_folder_exits_as_bad_input(model_dir, tmp_path, monkeypatch, caplog):
    case = case_with_file(tmp_path, "stack.tiff", b"")
    folder = case / "images" / INPUT_INTERFACE
    real_iterdir = type(folder).iterdir

    def denied(self):
        if self == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(type(folder), "iterdir", denied)  # as root, chmod 000 would not stop the read
    code = process.main(["--input", str(case), "--output", str(tmp_path / "out"), "--model", str(model_dir)])
    assert code == 2
    assert "unreadable folder (PermissionError: Permission denied)" in caplog.text


def test_a_device_from_the_environment_is_checked_like_the_option(model_dir, tmp_path):
    env = {**os.environ, "MIDOG_DEVICE": "gpu"}
    command = [sys.executable, PROCESS, "--input", REPO / "test" / "input", "--output", tmp_path / "out"]
    result = subprocess.run([*command, "--model", model_dir], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "MIDOG_DEVICE='gpu': expected one of auto, cuda, cpu" in result.stderr
    assert not (tmp_path / "out" / ANSWER_FILENAME).exists()


def test_a_graph_onnx_runtime_cannot_open_is_the_model_folders_failure(model_dir, tmp_path):
    """Its sha256 matches the manifest (the file was exported broken), so only ONNX Runtime can tell: exit 4."""
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    graph = manifest["graphs"][manifest["serve"]["cpu"]]["file"]
    (broken / graph).write_bytes(b"not an onnx graph")
    manifest["files"][graph] = sha256_of(broken / graph)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = run_on_the_sample(tmp_path / "out", broken, "--device", "cpu")
    assert result.returncode == 4
    assert_clean_failure(result, tmp_path / "out", graph, "ONNX Runtime cannot open it")
