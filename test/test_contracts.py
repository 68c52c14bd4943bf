import json

import numpy as np
import pytest

from contracts import (
    ContractError,
    ModelManifest,
    build_answer,
    classify,
    resample_to_pixel_size,
    sha256_of,
    validate_answer,
)

RAMP = np.tile(np.arange(128, dtype=np.uint8)[None, :, None], (128, 1, 3))  # value = column


def test_resampling_to_the_same_pixel_size_changes_nothing():
    pages = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    assert resample_to_pixel_size(pages, 0.23, 0.23) is pages


def test_larger_source_pixels_are_magnified_about_the_centre():
    out = resample_to_pixel_size(RAMP, 0.46, 0.23)  # twice the model's pixel size: the central half fills the page
    assert out.shape == RAMP.shape and out.dtype == np.uint8
    assert out[0, 0, 0] == 32 and out[0, -1, 0] == 95 and out[5, 64, 0] == 64
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # still a ramp, half as steep
    assert (out[0, :, 0] == out[77, :, 0]).all()  # rows of the ramp stay identical


def test_smaller_source_pixels_shrink_the_figure_and_reflect_the_borders():
    out = resample_to_pixel_size(RAMP, 0.115, 0.23)
    assert out[0, 32, 0] <= 1 and out[0, 95, 0] >= 126  # the whole ramp fits in the central half
    assert out[0, 0, 0] == 64 and out[0, -1, 0] in (63, 64)  # beyond it, reflected: no black border


def test_a_batch_resamples_as_its_pages_do_one_by_one():
    pages = np.random.default_rng(1).integers(0, 256, (3, 128, 96, 3), dtype=np.uint8)
    batch = resample_to_pixel_size(pages, 0.25, 0.23)
    assert batch.shape == pages.shape
    for page, resampled in zip(pages, batch, strict=True):
        assert np.array_equal(resample_to_pixel_size(page, 0.25, 0.23), resampled)


def test_answer_confidence_is_p_atypical_for_both_classes():
    answer = build_answer([0.9, 0.1, 0.5], threshold=0.5)
    assert answer == [
        {"class": "atypical", "confidence": 0.9},
        {"class": "normal", "confidence": 0.1},
        {"class": "atypical", "confidence": 0.5},  # p >= threshold is atypical
    ]


def test_answer_confidences_are_json_floats_even_for_round_values():
    answer = build_answer([0, 1], threshold=0.3)  # ints from an upstream bug must still serialize as floats
    text = json.dumps(answer)
    assert '"confidence": 0.0' in text and '"confidence": 1.0' in text
    assert all(type(e["confidence"]) is float for e in answer)


def test_threshold_decides_the_class():
    assert not classify(0.29, 0.3)
    assert classify(0.30, 0.3)
    probs = np.array([[0.1, 0.3], [0.5, 0.29]])
    np.testing.assert_array_equal(classify(probs, 0.3), [[False, True], [True, False]])
    # float32 probabilities are compared in float64, as a served float(p) is: 0.3f > 0.3
    assert classify(np.float32(0.3), 0.3) == (float(np.float32(0.3)) >= 0.3)
    assert [e["class"] for e in build_answer([0.2, 0.4], threshold=0.35)] == ["normal", "atypical"]


def test_answer_rejects_non_finite_probabilities():
    with pytest.raises(ContractError, match="non-finite"):
        build_answer([float("nan")], threshold=0.5)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([{"class": "normal", "confidence": 0.2}], "list of 2"),
        ({"class": "normal"}, "list of 2"),
        ([{"class": "normal", "confidence": 0.2}, {"class": "normal"}], "entry 1"),
        ([{"class": "normal", "confidence": 0.2}, {"class": "normal", "confidence": 1}], "entry 1"),
        ([{"class": "normal", "confidence": 0.2}, {"class": "mitosis", "confidence": 0.3}], "entry 1"),
        ([{"class": "normal", "confidence": 0.2}, {"class": "normal", "confidence": 1.5}], "entry 1"),
        ([{"class": "normal", "confidence": 0.2, "extra": 1}, {"class": "normal", "confidence": 0.1}], "entry 0"),
    ],
)
def test_validate_answer_rejects_what_the_scorer_rejects(answer, message):
    with pytest.raises(ContractError, match=message):
        validate_answer(answer, n_pages=2)


def _graph(tmp_path, name, content=b"graph"):
    (tmp_path / name).write_bytes(content)
    (tmp_path / f"{name}.data").write_bytes(content + b" weights")
    return {"file": name, "external_data": [f"{name}.data"]}


def _checksums(tmp_path, graphs):
    return {name: sha256_of(tmp_path / name) for g in graphs.values() for name in [g["file"], *g["external_data"]]}


def _manifest(tmp_path, **overrides):
    graphs = overrides.pop("graphs", None) or {"fp32": _graph(tmp_path, "ensemble.onnx")}
    fields = {
        "backbone": "tiny-virchow",
        "folds": 3,
        "threshold": 0.4,
        "graphs": graphs,
        "files": _checksums(tmp_path, graphs),
        "members": [
            {"run": "r", "backbone": "tiny-virchow", "folds": 3, "training_config": {}, "oof_metrics": {}},
        ],
        "oof_metrics": {"balanced_accuracy": 0.8},
        "created_utc": "2026-01-01T00:00:00+00:00",
    }
    fields.update(overrides)
    (tmp_path / "manifest.json").write_text(json.dumps(fields))
    return tmp_path


def test_manifest_roundtrip_and_checksums(tmp_path):
    model_dir = _manifest(tmp_path)
    manifest = ModelManifest.load(model_dir)
    manifest.verify_files(model_dir)
    manifest.verify_graph(model_dir, "fp32")
    assert manifest.threshold == 0.4 and manifest.input_name == "pixels" and manifest.output_name == "prob_atypical"

    for name in ("ensemble.onnx", "ensemble.onnx.data"):  # the graph and its external data are both checked
        original = (model_dir / name).read_bytes()
        (model_dir / name).write_bytes(b"tampered")
        with pytest.raises(ContractError, match=f"{name}: sha256"):
            manifest.verify_graph(model_dir, "fp32")
        (model_dir / name).unlink()
        with pytest.raises(ContractError, match=f"{name}: missing"):
            manifest.verify_graph(model_dir, "fp32")
        (model_dir / name).write_bytes(original)


def test_manifest_rejects_unknown_keys_and_bad_versions(tmp_path):
    with pytest.raises(ContractError, match="surprise"):
        ModelManifest.load(_manifest(tmp_path, surprise=1))
    with pytest.raises(ContractError, match="format_version"):
        ModelManifest.load(_manifest(tmp_path, format_version=2))
    with pytest.raises(ContractError, match="no manifest"):
        ModelManifest.load(tmp_path / "nowhere")


def test_manifest_lists_exactly_the_files_of_its_graphs(tmp_path):
    graphs = {"fp32": _graph(tmp_path, "ensemble.onnx")}
    files = _checksums(tmp_path, graphs)
    with pytest.raises(ContractError, match=r"\['ensemble.onnx.data'\] have no checksum"):
        ModelManifest.load(_manifest(tmp_path, graphs=graphs, files={"ensemble.onnx": files["ensemble.onnx"]}))
    with pytest.raises(ContractError, match=r"files \['notes.txt'\] belong to no graph"):
        ModelManifest.load(_manifest(tmp_path, graphs=graphs, files={**files, "notes.txt": "0" * 64}))


def test_manifest_serves_only_graphs_that_passed_parity(tmp_path):
    graphs = {"fp32": _graph(tmp_path, "ensemble.onnx"), "fp16": _graph(tmp_path, "ensemble.fp16.onnx", b"half")}
    fp16 = {"graphs": graphs, "serve": {"cuda": "fp16", "cpu": "fp32"}}
    check = {"max_abs_dp": 2e-4, "class_agreement": 1.0, "patches": 64, "provider": "CPUExecutionProvider"}
    manifest = ModelManifest.load(_manifest(tmp_path, **fp16, parity={"fp16": {**check, "accepted": True}}))
    assert manifest.graph_for("cuda")[0] == "fp16" and manifest.graph_for("cuda")[1].file == "ensemble.fp16.onnx"
    assert manifest.graph_for("cpu")[1].names == ["ensemble.onnx", "ensemble.onnx.data"]
    with pytest.raises(ContractError, match="no accepted parity check"):
        ModelManifest.load(_manifest(tmp_path, **fp16, parity={"fp16": {**check, "accepted": False}}))
    with pytest.raises(ContractError, match="no accepted parity check"):
        ModelManifest.load(_manifest(tmp_path, **fp16))
    with pytest.raises(ContractError, match=r"serve\.cuda is fp32, which graphs does not name"):  # default serve
        ModelManifest.load(
            _manifest(tmp_path, graphs={"fp16": graphs["fp16"]}, parity={"fp16": {**check, "accepted": True}})
        )


def test_manifest_serves_a_graph_on_every_device(tmp_path):
    graphs = {"fp32": _graph(tmp_path, "ensemble.onnx")}
    with pytest.raises(ContractError, match="serve names no graph for cpu"):
        ModelManifest.load(_manifest(tmp_path, graphs=graphs, serve={"cuda": "fp32"}))


def test_a_run_verifies_only_the_graph_it_loads(tmp_path):
    graphs = {"fp32": _graph(tmp_path, "ensemble.onnx"), "int8": _graph(tmp_path, "ensemble.int8.onnx", b"int8")}
    check = {"max_abs_dp": 0.004, "class_agreement": 1.0, "patches": 128, "provider": "CPUExecutionProvider"}
    serve = {"cuda": "fp32", "cpu": "int8"}
    manifest = ModelManifest.load(
        _manifest(tmp_path, graphs=graphs, serve=serve, parity={"int8": {**check, "accepted": True}})
    )
    (tmp_path / "ensemble.onnx.data").unlink()
    manifest.verify_graph(tmp_path, "int8")
    with pytest.raises(ContractError, match="missing"):
        manifest.verify_files(tmp_path)


def test_manifest_serves_int8_on_the_cpu_only_after_its_own_parity_check(tmp_path):
    graphs = {
        name: _graph(tmp_path, f"ensemble{suffix}.onnx", name.encode())
        for name, suffix in (("fp32", ""), ("fp16", ".fp16"), ("int8", ".int8"))
    }
    serve = {"cuda": "fp16", "cpu": "int8"}
    check = {"max_abs_dp": 0.004, "class_agreement": 0.992, "patches": 128, "provider": "CPUExecutionProvider"}
    passed = {"fp16": {**check, "accepted": True}, "int8": {**check, "accepted": True}}
    manifest = ModelManifest.load(_manifest(tmp_path, graphs=graphs, serve=serve, parity=passed))
    assert manifest.graph_for("cpu")[1].file == "ensemble.int8.onnx"
    assert manifest.graph_for("cuda")[1].file == "ensemble.fp16.onnx"
    with pytest.raises(ContractError, match=r"serve\.cpu is int8, which has no accepted parity check"):
        ModelManifest.load(_manifest(tmp_path, graphs=graphs, serve=serve, parity={"fp16": passed["fp16"]}))
