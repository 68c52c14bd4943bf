"""Export: merged == unmerged per fold, merged != base, ONNX == PyTorch, the graph's I/O, the manifest."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from contracts import ModelManifest
from training.config import load_config
from training.export import ONNX_ATOL, compare_with_torch, fold_model
from training.model import Ensemble, build_classifier
from training.preprocess import Preprocess
from training.synthetic import synthetic_figures


@pytest.fixture(scope="module")
def pixels():
    return synthetic_figures(8, seed=5, n_slides=2)[0]


@pytest.fixture(scope="module")
def merged_folds(demo_run, pixels):
    cfg = load_config(demo_run["run"] / "config.yaml")
    return [fold_model(demo_run["run"], k, pixels) for k in range(cfg.folds)]  # each checks merged == unmerged


def test_merged_folds_differ_from_the_base_and_each_other(demo_run, merged_folds, pixels):
    cfg = load_config(demo_run["run"] / "config.yaml")
    base = build_classifier(cfg.backbone, cfg.weights).eval()
    x = Preprocess.for_backbone(base.backbone)(torch.from_numpy(pixels))
    qkv = [f.backbone.blocks[0].attn.qkv.weight for f in merged_folds]
    assert not torch.equal(qkv[0], base.backbone.blocks[0].attn.qkv.weight), "the adapter changed nothing"
    assert not torch.equal(qkv[0], qkv[1])
    with torch.no_grad():
        assert not torch.allclose(merged_folds[0](x), merged_folds[1](x))
    assert not any("lora" in name for f in merged_folds for name, _ in f.named_parameters())


def test_folds_built_on_one_base_share_its_unchanged_weights(demo_run, merged_folds, pixels):
    """Export's path (the base built once) gives the very logits of folds built apart, holding the base once."""
    cfg = load_config(demo_run["run"] / "config.yaml")
    base = build_classifier(cfg.backbone, cfg.weights).eval()
    shared = [fold_model(demo_run["run"], k, pixels, base) for k in range(cfg.folds)]
    blocks = [fold.backbone.blocks[0] for fold in shared]
    assert blocks[0].mlp.fc1.weight is blocks[1].mlp.fc1.weight is base.backbone.blocks[0].mlp.fc1.weight
    assert blocks[0].attn.qkv.weight is not blocks[1].attn.qkv.weight
    x = Preprocess.for_backbone(base.backbone)(torch.from_numpy(pixels))
    with torch.no_grad():
        for alone, together in zip(merged_folds, shared, strict=True):
            assert torch.equal(alone(x), together(x))


def test_onnx_matches_pytorch_on_real_looking_pages(demo_run, merged_folds, pixels):
    """The exported graph, weights stored once, against the folds merged apart (no weight shared in PyTorch)."""
    ensemble = Ensemble(Preprocess.for_backbone(merged_folds[0].backbone), merged_folds).eval()
    odd_size = np.ascontiguousarray(pixels[:3, :100, :120])
    worst = compare_with_torch(ensemble, demo_run["model"] / "ensemble.onnx", [pixels, pixels[:1], odd_size])
    assert worst <= ONNX_ATOL


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_a_weight_the_folds_share_is_stored_once(demo_run, precision):
    """LoRA changed the attention projections only: each block's MLP weights are one initializer that the three
    folds read, each fold's qkv its own; no two initializers hold the same content."""
    manifest = ModelManifest.load(demo_run["model"])
    graph = onnx.load(str(demo_run["model"] / manifest.graphs[precision].file)).graph
    contents = [(t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in graph.initializer]
    assert len(set(contents)) == len(contents)
    block = build_classifier("tiny-virchow").backbone.blocks[0]
    blocks = len(build_classifier("tiny-virchow").backbone.blocks)

    def stored(weight: torch.Tensor) -> int:
        shapes = {tuple(weight.shape), tuple(weight.shape[::-1])}  # as in torch, or transposed for MatMul
        return sum(tuple(t.dims) in shapes for t in graph.initializer)

    assert stored(block.mlp.fc1.weight) == stored(block.mlp.fc2.weight) == blocks  # shared: once a block
    assert stored(block.attn.qkv.weight) == 3 * blocks  # merged with each fold's adapter


def test_graph_has_named_dynamic_io(demo_run):
    model = onnx.load(str(demo_run["model"] / "ensemble.onnx"), load_external_data=False)
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, True, True, False] and dims[3].dim_value == 3
    assert out.name == "prob_atypical" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = ort.InferenceSession(str(demo_run["model"] / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        (probs,) = session.run(None, {"pixels": np.zeros((n, 128, 128, 3), np.uint8)})
        assert probs.shape == (n,) and np.all((probs > 0) & (probs < 1))


def test_manifest_describes_the_run(demo_run):
    manifest = ModelManifest.load(demo_run["model"])
    manifest.verify_files(demo_run["model"])
    summary = json.loads((demo_run["run"] / "summary.json").read_text())
    assert manifest.threshold == summary["threshold"]
    assert manifest.folds == 3 and manifest.backbone == "tiny-virchow"
    assert manifest.oof_metrics["balanced_accuracy"] == summary["oof"]["balanced_accuracy"]
    (member,) = manifest.members
    assert member.training_config == load_config(demo_run["run"] / "config.yaml").model_dump()
    assert (member.run, member.folds, member.oof_metrics) == (demo_run["run"].name, 3, manifest.oof_metrics)


def test_run_folder_layout(demo_run):
    run = demo_run["run"]
    for name in ("config.yaml", "provenance.json", "splits.json", "oof.csv", "summary.json"):
        assert (run / name).is_file(), name
    for k in range(3):
        for name in (
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "log.csv",
            "best.json",
            "checkpoint.pt",
        ):
            assert (run / f"fold_{k}" / name).is_file(), f"fold_{k}/{name}"
        assert list((run / f"fold_{k}" / "tensorboard").glob("events.out.tfevents.*"))
    oof = (run / "oof.csv").read_text().splitlines()
    assert oof[0] == "image_id,fold,label,prob_atypical,domain,tumor,votes,path" and len(oof) == 1 + 600


def test_export_refuses_a_run_with_unfinished_folds(demo_run, tmp_path):
    import shutil

    from training.export import export_run

    run = shutil.copytree(demo_run["run"], tmp_path / "run")
    (run / "fold_1" / "best.json").unlink()  # as a killed fold job leaves it
    with pytest.raises(ValueError, match=r"fold\(s\) \[1\] have not finished"):
        export_run([run], tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_one_fold_exports_alone(demo_run, merged_folds, pixels, tmp_path):
    """A single fold of a run (a leave-one-scanner-out fold, to serve on its unseen scanner) exports as a
    one-fold ensemble whose graph gives that fold's probabilities."""
    from conftest import run_cli

    run_cli("-m", "training", "export", demo_run["run"], "--output", tmp_path / "fold1", "--fold", "1")
    manifest = ModelManifest.load(tmp_path / "fold1")
    assert manifest.folds == 1
    session = ort.InferenceSession(str(tmp_path / "fold1" / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        x = Preprocess.for_backbone(merged_folds[1].backbone)(torch.from_numpy(pixels))
        expected = torch.sigmoid(merged_folds[1](x)).numpy()
    np.testing.assert_allclose(session.run(None, {"pixels": pixels})[0], expected, atol=ONNX_ATOL)
    result = run_cli(
        "-m", "training", "export", demo_run["run"], "--output", tmp_path / "bad", "--fold", "3", check=False
    )
    assert result.returncode == 1 and "folds [3] outside 0..2" in result.stderr


def test_a_run_folder_refuses_a_different_config(demo_run):
    from training.train import train_run

    cfg = load_config(demo_run["run"] / "config.yaml")
    with pytest.raises(ValueError, match=r"different config \(epochs\)"):
        train_run(cfg.model_copy(update={"epochs": cfg.epochs + 1}), [demo_run["data"]], demo_run["run"])


def test_predict_scores_a_dataset_through_the_serving_path(demo_run, tmp_path):
    from conftest import run_cli

    from contracts import ModelManifest

    def predict(out, *extra):
        command = ["-m", "training", "predict", demo_run["model"], "--data-root", demo_run["data"], "--output", out]
        run_cli(*command, "--device", "cpu", *extra)

    out = tmp_path / "preds.csv"
    predict(out)
    rows = out.read_text().splitlines()
    assert rows[0] == "image_id,label,prob_atypical,pred,domain,votes,path" and len(rows) == 601
    threshold = ModelManifest.load(demo_run["model"]).threshold
    for row in rows[1:]:
        _, label, prob, pred, _, votes, path = row.split(",")
        assert len(votes) in (2, 3) and path.endswith(".png")
        assert int(pred) == (float(prob) >= threshold) and label in ("0", "1")
    report = run_cli("-m", "training", "evaluate", "--predictions", out)  # predict's output feeds evaluate
    assert "bootstrap interval" in report.stdout
    # the CPU serves int8; --precision scores the fp32 reference instead, and the two stay within int8's guard
    fp32 = tmp_path / "preds-fp32.csv"
    predict(fp32, "--precision", "fp32")
    p8, p32 = (np.array([float(r.split(",")[2]) for r in f.read_text().splitlines()[1:]]) for f in (out, fp32))
    assert 0 < np.abs(p8 - p32).max() <= 0.02


def test_reduced_precisions_are_served_only_after_parity_with_fp32(demo_run, pixels):
    manifest = ModelManifest.load(demo_run["model"])
    fp16, int8 = manifest.parity["fp16"], manifest.parity["int8"]
    assert fp16.accepted and int8.accepted and manifest.serve == {"cuda": "fp16", "cpu": "int8"}
    assert fp16.patches == int8.patches == 128 and int8.provider == "CPUExecutionProvider"
    assert fp16.class_agreement == 1.0 and 0 < fp16.max_abs_dp <= 1e-3
    assert int8.class_agreement >= 0.99 and 0 < int8.max_abs_dp <= 0.02
    half = onnx.load(str(demo_run["model"] / manifest.graphs["fp16"].file))
    weights = [init.data_type for init in half.graph.initializer if len(init.dims) >= 2]
    assert weights and all(t == onnx.TensorProto.FLOAT16 for t in weights)
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # the contract's float32
    quantized = onnx.load(str(demo_run["model"] / manifest.graphs["int8"].file))
    ops = {node.op_type for node in quantized.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert all(init.data_type != onnx.TensorProto.FLOAT for init in quantized.graph.initializer if len(init.dims) == 2)
    runs = [
        ort.InferenceSession(str(demo_run["model"] / manifest.graphs[p].file), providers=["CPUExecutionProvider"])
        for p in ("fp32", "fp16", "int8")
    ]
    p32, p16, p8 = (s.run(None, {"pixels": pixels})[0] for s in runs)
    assert 0 < np.abs(p32 - p16).max() <= 1e-3
    assert 0 < np.abs(p32 - p8).max() <= 0.02


def test_reduced_precisions_that_fail_parity_are_refused_and_recorded(demo_run, tmp_path, monkeypatch):
    import dataclasses

    import training.export as export

    exact = tuple(dataclasses.replace(r, max_dp=0.0) for r in export.REDUCED_PRECISIONS)  # none can be that exact
    monkeypatch.setattr(export, "REDUCED_PRECISIONS", exact)
    manifest = export.export_run([demo_run["run"]], tmp_path / "model")
    assert list(manifest.graphs) == ["fp32"] and manifest.serve == {"cuda": "fp32", "cpu": "fp32"}
    assert manifest.graphs["fp32"].names == ["ensemble.onnx", "ensemble.onnx.data"]
    for precision in ("fp16", "int8"):
        assert not manifest.parity[precision].accepted and manifest.parity[precision].max_abs_dp > 0
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "ensemble.onnx",
        "ensemble.onnx.data",
        "manifest.json",
    ]


def test_fp16_conversion_path_for_graphs_over_2gb(demo_run, pixels, tmp_path, monkeypatch):
    """Graphs beyond protobuf's 2 GB skip shape inference; the same path, forced on the demo graph, still works."""
    import shutil

    import training.precision as precision

    for name in ("ensemble.onnx", "ensemble.onnx.data"):
        shutil.copy(demo_run["model"] / name, tmp_path / name)
    monkeypatch.setattr(precision, "PROTOBUF_LIMIT", 0)
    precision.write_fp16(tmp_path / "ensemble.onnx", tmp_path / "big.fp16.onnx")
    assert (tmp_path / "big.fp16.onnx.data").is_file()  # weights kept outside the protobuf
    fp16 = precision.REDUCED_PRECISIONS[0]
    check = precision.check_parity(tmp_path / "ensemble.onnx", tmp_path / "big.fp16.onnx", pixels, 0.5, fp16)
    assert check.accepted and check.patches == len(pixels)


def test_int8_quantizes_folds_that_share_their_weights(pixels, tmp_path):
    """Folds on one frozen base: the exporter keeps each shared Linear weight once, behind a Transpose node, so
    no MatMul reads a constant weight and the quantizer alone would skip them all; write_int8 folds the
    transposes, and each shared weight is stored once in the int8 graph."""
    from training.export import export_onnx
    from training.precision import REDUCED_PRECISIONS, check_parity, write_int8

    fold = build_classifier("tiny-virchow").eval()
    linears = 2 * sum(isinstance(m, torch.nn.Linear) for m in fold.modules())  # 2 folds: 3 blocks of 4, the head
    ensemble = Ensemble(Preprocess.for_backbone(fold.backbone), [fold, fold]).eval()
    export_onnx(ensemble, torch.from_numpy(pixels[:2]), tmp_path / "shared.onnx")
    graph = onnx.load(str(tmp_path / "shared.onnx")).graph
    constants = {t.name for t in graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in constants for n in graph.node)
    write_int8(tmp_path / "shared.onnx", tmp_path / "shared.int8.onnx")
    quantized = onnx.load(str(tmp_path / "shared.int8.onnx")).graph
    assert sum(n.op_type == "MatMulInteger" for n in quantized.node) == linears == 26
    int8_weights = [t for t in quantized.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == 13  # each once: the head's Gemm copies, which the quantizer needs, merged after
    int8 = REDUCED_PRECISIONS[1]
    check = check_parity(tmp_path / "shared.onnx", tmp_path / "shared.int8.onnx", pixels, 0.5, int8)
    # within int8's probability limit; classes are not compared: an untrained model answers every page near 0.5,
    # where a CPU without VNNI (AVX2's int8 kernels) flips some of them within that limit
    assert 0 < check.max_abs_dp <= int8.max_dp
