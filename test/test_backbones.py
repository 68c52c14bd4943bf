"""The backbone registry, Virchow's offline loading path (exercised on a Virchow-shaped tiny ViT), pooling, LoRA."""

import json

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import GluMlp, LayerScale
from torch import nn

from training.adapt import apply_lora
from training.backbones import (
    TINY_VIRCHOW_ARGS,
    TINY_VIRCHOW_CFG,
    VIRCHOW_LAYERS,
    WeightsUnavailableError,
    build_virchow,
    create_backbone,
    load_pretrained_vit,
)
from training.config import LoraSettings
from training.model import Preprocess, build_classifier


def _save_timm_folder(model: nn.Module, folder):
    """A folder shaped like Virchow's hub snapshot: timm config.json (no layer classes in it) + safetensors."""
    folder.mkdir(parents=True)
    config = {
        "architecture": "vit_huge_patch14_224",
        "model_args": {k: v for k, v in TINY_VIRCHOW_ARGS.items() if k not in VIRCHOW_LAYERS},
        "pretrained_cfg": {k: v for k, v in TINY_VIRCHOW_CFG.items() if v is not None},
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), folder / "model.safetensors")
    return folder


def test_tiny_virchow_has_virchows_block_design():
    model = create_backbone("tiny-virchow")
    block = model.blocks[0]
    assert isinstance(block.mlp, GluMlp) and isinstance(block.mlp.act, nn.SiLU)
    assert not block.mlp.gate_last  # SwiGLUPacked, as Virchow
    assert isinstance(block.ls1, LayerScale)
    assert model.patch_embed.patch_size == (14, 14)
    assert model.num_prefix_tokens == 1


def test_tiny_virchow_is_rebuilt_identically():
    a, b = create_backbone("tiny-virchow"), create_backbone("tiny-virchow")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_embedding_is_cls_plus_mean_of_patch_tokens():
    clf = build_classifier("tiny-virchow").eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        tokens = clf.backbone.forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
        assert torch.allclose(clf.embed(x), expected)
    assert clf.embedding_dim == 2 * 96
    assert clf(x).shape == (2,)


def test_preprocessing_comes_from_the_pretrained_cfg():
    backbone = create_backbone("tiny-virchow")
    pre = Preprocess.for_backbone(backbone)
    assert pre.size == (112, 112) and pre.mode == "bicubic"
    pixels = torch.full((1, 128, 128, 3), 255, dtype=torch.uint8)
    out = pre(pixels)
    std, mean = torch.tensor([0.229, 0.224, 0.225]), torch.tensor([0.485, 0.456, 0.406])
    assert out.shape == (1, 3, 112, 112)
    assert torch.allclose(out[0, :, 50, 50], (1 - mean) / std, atol=1e-5)


def test_local_dir_loads_a_virchow_style_folder(tmp_path):
    source = create_backbone("tiny-virchow")
    folder = _save_timm_folder(source, tmp_path / "virchow")
    loaded = load_pretrained_vit(f"local-dir:{folder}", **VIRCHOW_LAYERS).eval()
    assert isinstance(loaded.blocks[0].mlp, GluMlp)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(x), source.eval().forward_features(x), atol=1e-6)
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, 112, 112)


def test_virchow_loads_offline_from_the_hf_cache(tmp_path, monkeypatch):
    """build_virchow's real path: 'hf-hub:paige-ai/Virchow' resolved in the local cache, nothing downloaded."""
    snapshot = tmp_path / "hub" / "models--paige-ai--Virchow" / "snapshots" / "0123abcd"
    _save_timm_folder(create_backbone("tiny-virchow"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = build_virchow(None)
    assert isinstance(model.blocks[0].mlp, GluMlp) and isinstance(model.blocks[0].mlp.act, nn.SiLU)


def test_missing_virchow_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsUnavailableError, match="hf auth login"):
        build_virchow(None)
    with pytest.raises(WeightsUnavailableError, match=r"config\.json"):
        build_virchow(f"local-dir:{tmp_path}")


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match=r"known: .*tiny-virchow, virchow"):
        create_backbone("resnet")


def test_lora_targets_attention_projections_only():
    model = apply_lora(build_classifier("tiny-virchow"), LoraSettings())
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A"))
    depth = TINY_VIRCHOW_ARGS["depth"]
    assert adapted == sorted([f"backbone.blocks.{i}.attn.{p}" for i in range(depth) for p in ("proj", "qkv")])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".atypia_head.modules_to_save." in n for n in trainable)
    assert not any("patch_embed" in n for n in trainable)
