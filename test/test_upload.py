"""What a GPU platform is handed, and what a run reads: the upload holds the served graph and its manifest only; a
run verifies the graph it loads, refuses it tampered, and never looks at files it does not load."""

import json
import shutil

import numpy as np
import pytest
from conftest import PROCESS, REPO, answer_for, assert_clean_failure, run_cli

from contracts import ModelManifest, sha256_of
from training.upload import write_upload

SAMPLE = REPO / "test" / "input"


@pytest.fixture(scope="module")
def upload(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("upload") / "upload"
    run_cli("-m", "training", "upload", model_dir, "--output", out)
    return out


def test_the_upload_holds_only_the_cuda_graph_and_the_manifest(model_dir, upload):
    export = ModelManifest.load(model_dir)
    manifest = ModelManifest.load(upload)
    precision, graph = export.graph_for("cuda")
    assert precision == "fp16" and list(manifest.graphs) == ["fp16"]
    assert sorted(p.name for p in upload.iterdir()) == sorted(["manifest.json", *graph.names])
    assert set(manifest.files) == set(graph.names) and manifest.serve == {"cuda": "fp16", "cpu": "fp16"}
    assert manifest.files == {name: export.files[name] for name in graph.names}
    assert manifest.parity == export.parity and manifest.threshold == export.threshold
    manifest.verify_files(upload)


def test_the_upload_answers_as_the_exports_cuda_graph(model_dir, upload, tmp_path):
    """Run on the CPU, the upload serves its fp16 graph: the export's fp16 answers, not its int8 ones."""
    import process

    pages = process.read_stack(process.find_stack(SAMPLE)).pages
    served = process.OnnxEnsemble(upload, "cpu")
    assert served.precision == "fp16"
    fp16 = process.OnnxEnsemble(model_dir, "cpu", precision="fp16").predict(pages)
    assert np.array_equal(served.predict(pages), fp16)
    answer, _ = answer_for(SAMPLE, upload, tmp_path / "out")
    assert [entry["confidence"] for entry in answer] == pytest.approx(fp16.tolist(), abs=1e-7)


def test_an_upload_replaces_an_earlier_one_and_refuses_a_foreign_folder(model_dir, tmp_path):
    target = tmp_path / "upload"
    write_upload(model_dir, target)
    write_upload(model_dir, target)  # again, over its own earlier upload
    assert len(list(target.iterdir())) == 3
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        write_upload(model_dir, target)
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / "thesis.pdf").write_text("")
    with pytest.raises(ValueError, match="not a model folder"):
        write_upload(model_dir, foreign)
    with pytest.raises(ValueError, match="another folder"):
        write_upload(model_dir, model_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_upload(model_dir, empty)  # an empty folder is fine
    assert (empty / "manifest.json").is_file()


def test_a_failed_upload_leaves_the_earlier_one_whole(model_dir, tmp_path, monkeypatch):
    import training.upload as upload

    target = tmp_path / "upload"
    write_upload(model_dir, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(upload, "_place", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_upload(model_dir, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["upload"]  # no staging folder left behind


@pytest.mark.parametrize("part", ["graph", "external data"])
def test_a_tampered_graph_that_is_loaded_is_refused(upload, tmp_path, part):
    broken = shutil.copytree(upload, tmp_path / "model")
    graph = ModelManifest.load(broken).graphs["fp16"]
    name = graph.file if part == "graph" else graph.external_data[0]
    with (broken / name).open("r+b") as f:  # one byte changed, the size kept
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    result = run_cli(
        PROCESS, "--input", SAMPLE, "--output", tmp_path / "out", "--model", broken, "--device", "cpu", check=False
    )
    assert result.returncode == 4
    assert_clean_failure(result, tmp_path / "out", name, "sha256 does not match the manifest")


def test_the_graph_opened_after_a_cuda_fallback_is_verified_too(model_dir, tmp_path):
    """device auto: this onnxruntime build lists CUDA, which does not load here, so the run falls back to the
    CPU's graph (int8), a second graph: tampered, it is refused as the first would be."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to fall back from")
    tampered = shutil.copytree(model_dir, tmp_path / "model")
    (tampered / "ensemble.int8.onnx").write_bytes((tampered / "ensemble.int8.onnx").read_bytes() + b"\0")
    result = run_cli(
        PROCESS, "--input", SAMPLE, "--output", tmp_path / "out", "--model", tampered, "--device", "auto", check=False
    )
    if "CUDA provider did not load" not in result.stderr:
        pytest.skip("the CUDA provider loaded: no fallback on this machine")
    assert result.returncode == 4
    assert_clean_failure(result, tmp_path / "out", "ensemble.int8.onnx", "sha256")


def test_files_of_graphs_the_run_does_not_load_are_not_looked_at(model_dir, tmp_path):
    """The CPU serves int8: fp32 absent and fp16 garbled change nothing, not even a warning."""
    trimmed = shutil.copytree(model_dir, tmp_path / "model")
    manifest = ModelManifest.load(trimmed)
    for name in manifest.graphs["fp32"].names:
        (trimmed / name).unlink()
    for name in manifest.graphs["fp16"].names:
        (trimmed / name).write_bytes(b"garbled")
    answer, result = answer_for(SAMPLE, trimmed, tmp_path / "out")
    expected, _ = answer_for(SAMPLE, model_dir, tmp_path / "expected")
    assert answer == expected and "WARNING" not in result.stderr


def test_the_manifests_checksums_cover_the_upload_exactly(upload):
    manifest = json.loads((upload / "manifest.json").read_text())
    on_disk = {p.name: sha256_of(p) for p in upload.iterdir() if p.name != "manifest.json"}
    assert manifest["files"] == on_disk
