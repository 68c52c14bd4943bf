"""Container timings: the cold-start measurement runs process.py for real and accounts for its parts."""

import json

import pytest
from conftest import red_mean_model, run_cli


def test_cold_start_times_the_container_path(tmp_path):
    model = red_mean_model(tmp_path / "model")
    run_cli("-m", "training", "cold-start", model, "--repeats", "2", "--json", tmp_path / "cold.json")
    result = json.loads((tmp_path / "cold.json").read_text())
    assert result["device"] == "cpu" and result["precision"] == "fp32" and result["repeats"] == 2
    assert result["provider"] == "CPUExecutionProvider"
    parts = result["imports_s"] + result["session_s"] + result["predict_s"]
    assert 0 < result["predict_s"] < parts  # every part measured
    assert parts < 3 * result["cold_start_s"]  # the parts belong to the same path as the whole
    assert result["cold_start_s_min"] <= result["cold_start_s"]
    assert result["session_as_exported_s"] > 0 and result["session_preoptimized_s"] > 0
    assert result["verify_served_graph_s"] > 0 and result["verify_every_file_s"] > 0


def tiny_virchow_stack_gflops() -> float:
    """By hand: 3 folds x 16 pages of tiny-virchow (3 blocks of width 96, 8 x 8 patches + CLS, SwiGLU-packed
    MLP 96 -> 512 -> 256 -> 96), a multiply-add counted as 2 FLOPs, as PyTorch's counter counts them."""
    tokens, width, mlp = 65, 96, 512
    block = 2 * tokens * width * (3 * width + width + mlp + mlp // 2) + 2 * 2 * tokens * tokens * width
    image = 3 * block + 2 * 64 * (3 * 14 * 14) * width + 2 * 2 * width  # blocks, patch embedding, head
    return 3 * 16 * image / 1e9


def test_bench_times_peer_and_ours_on_the_same_weights(tmp_path):
    run_cli("-m", "training", "bench", "--backbone", "tiny-virchow", "--repeats", "2", "--json", tmp_path / "b.json")
    result = json.loads((tmp_path / "b.json").read_text())
    required = (
        "device",
        "backbone",
        "peer_s_per_stack",
        "ours_s_per_stack",
        "cold_start_s",
        "gflops_per_stack",
        "achieved_tflops",
    )
    assert set(required) <= set(result) and result["device"] == "cpu" and result["backbone"] == "tiny-virchow"
    assert all(result[key] > 0 for key in required[2:])
    assert result["gflops_per_stack"] == pytest.approx(tiny_virchow_stack_gflops(), rel=1e-9)
    assert result["achieved_tflops"] == pytest.approx(result["gflops_per_stack"] / result["ours_s_per_stack"] / 1e3)
    # ours serves int8 on the CPU, accepted by the export's parity guard, and answers as the peer does
    assert result["ours_precision"] == "int8" and result["parity"]["int8"]["accepted"]
    assert result["ours_provider"] == "CPUExecutionProvider"
    assert 0 < result["max_abs_dp_ours_vs_peer"] <= 0.02
    # the CPU's limit: ONNX Runtime's best rate on one large int8 matrix product, which a stack cannot beat
    assert result["peak_source"] == "measured int8 matmul ceiling"
    assert 0 < result["hardware_limit_s_per_stack"] < result["ours_s_per_stack"]
    # the sizes: one fold's parameters, each graph's bytes, and the upload a GPU platform gets (fp16, its parity
    # checked on this CPU), which stores the weights the folds share once
    assert result["params_per_fold"] == 399_745  # 3 blocks of width 96, the patch embedding, the 192-wide head
    assert set(result["model_bytes"]) == {"fp32", "fp16", "int8"} and result["upload_precision"] == "fp16"
    assert result["parity"]["fp16"]["accepted"]
    assert result["model_bytes"]["fp16"] < result["upload_bytes"] < result["model_bytes"]["fp16"] + 4096  # + manifest
    assert result["upload_bytes"] <= 0.60 * 3 * result["params_per_fold"] * 2
    assert 0.5 < result["upload_vs_three_fp16_folds"] < 0.6  # 5/9 and the protobuf: the MLPs are stored once


def test_peer_folds_are_unmerged_lora_models_that_merging_changes():
    import torch
    from peft import PeftModel

    from training.lab.bench import peer_folds

    folds = peer_folds("tiny-virchow", torch.device("cpu"))
    assert len(folds) == 3 and all(isinstance(f, PeftModel) for f in folds)
    b = [dict(f.named_parameters())["base_model.model.backbone.blocks.0.attn.qkv.lora_B.default.weight"] for f in folds]
    assert all(w.abs().sum() > 0 for w in b) and not torch.equal(b[0], b[1])
    base_qkv = folds[0].get_base_model().backbone.blocks[0].attn.qkv.base_layer.weight.clone()
    merged = folds[0].merge_and_unload()
    assert not torch.equal(merged.backbone.blocks[0].attn.qkv.weight, base_qkv)


def test_bench_train_counts_model_flops_and_times_both_recipes(tmp_path):
    out = tmp_path / "t.json"
    run_cli("-m", "training", "bench-train", "--steps", "1", "--batch-size", "4", "--peak-tflops", "1", "--json", out)
    result = json.loads(out.read_text())
    assert result["backbone"] == "tiny-virchow" and result["batch_size"] == 4
    forward = tiny_virchow_stack_gflops() / 3 / 16 * 4 * 1e9  # one fold, 4 images
    # forward + backward of LoRA: input gradients through every frozen layer but the patch embedding (about one
    # forward again); weight gradients only for the small adapters and the head. Not full training's 3x forward.
    assert 1.9 * forward < result["model_tflop_per_step"] * 1e12 < 2.2 * forward
    for recipe in ("naive", "optimized"):
        figures = result[recipe]
        assert figures["images_per_s"] == pytest.approx(4 / figures["s_per_step"])
        assert figures["mfu"] == pytest.approx(figures["achieved_tflops"])  # against a peak of 1 TFLOP/s
    assert result["speedup"] == pytest.approx(result["naive"]["s_per_step"] / result["optimized"]["s_per_step"])


def test_gpu_check_rehearses_on_the_cpu_with_the_tiny_backbone(tmp_path):
    """``make gpu-check``'s code, end to end, on the CPU: the container's path (PyTorch fp16 where onnxruntime has
    no CUDA provider, and the JSON says so), the peer path, cold start in fresh processes, training MFU."""
    from training.lab.gpu_check import onnxruntime_cuda

    run_cli(
        "-m",
        "training",
        "gpu-check",
        "--device",
        "cpu",
        "--backbone",
        "tiny-virchow",
        "--repeats",
        "1",
        "--train-batch-size",
        "4",
        "--json",
        tmp_path / "gpu.json",
    )
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["device"] == "cpu" and result["backbone"] == "tiny-virchow"
    assert result["container_path"].startswith("pytorch-fp16: merged folds, the stack as one batch")
    serving = result["serving"]
    assert serving["pages"] == 16 and serving["ours_s_per_stack"] > 0 and serving["peer_s_per_stack"] > 0
    assert serving["speedup_vs_peer"] == pytest.approx(serving["peer_s_per_stack"] / serving["ours_s_per_stack"])
    assert 0 < serving["max_abs_dp_ours_vs_peer"] <= 1e-2  # fp16 merged against fp32 unmerged, same weights
    assert serving["cold_start_s"] > 0 and serving["cold_start_repeats"] == 3 and serving["peak_vram_bytes"] is None
    training = result["training"]
    assert training["batch_size"] == 4 and training["model_tflop_per_step"] > 0
    assert {"naive", "optimized"} <= set(training) and training["optimized"]["images_per_s"] > 0
    assert result["wall_s"] > 0
    import torch

    if not torch.cuda.is_available():  # then the probe must say so, whatever the onnxruntime build lists
        available, why = onnxruntime_cuda()
        assert not available and ("no CUDA provider" in why or "no GPU visible" in why)
