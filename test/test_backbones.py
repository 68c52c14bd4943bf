"""The backbone registry, Virchow's offline loading path (exercised on a Virchow-shaped tiny ViT), pooling, LoRA."""

import json

import huggingface_hub.constants
import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file
from timm.layers import GluMlp, LayerScale
from torch import nn

from training.adapt import apply_lora
from training.backbones import (
    TINY_VIRCHOW_ARGS,
    TINY_VIRCHOW_CFG,
    VIRCHOW_LAYERS,
    WeightsUnavailableError,
    create_backbone,
    load_pretrained_vit,
)
from training.model import build_classifier
from training.preprocess import Preprocess
from training.spec import LoraSettings


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


@pytest.mark.parametrize(
    ("name", "millions", "width"), [("vit-base-random", 86, 768), ("virchow-size-random", 631, 1280)]
)
def test_benchmark_models_have_virchows_blocks_at_their_size(name, millions, width):
    with torch.device("meta"):  # shapes only: Virchow's size would take 2.5 GB
        model = create_backbone(name)
    block = model.blocks[0]
    assert isinstance(block.mlp, GluMlp) and not block.mlp.gate_last and isinstance(block.mlp.act, nn.SiLU)
    assert block.mlp.fc1.out_features % 2 == 0 and model.patch_embed.patch_size == (14, 14)
    assert model.num_features == width and model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions


def test_tiny_virchow_is_rebuilt_identically():
    a, b = create_backbone("tiny-virchow"), create_backbone("tiny-virchow")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize(
    ("name", "prefix_tokens", "embedding"),
    [
        ("tiny-virchow", 1, 192),
        ("tiny-virchow2", 5, 192),
        ("tiny-uni", 1, 96),
        ("tiny-uni2-h", 9, 96),
        ("tiny-h-optimus-0", 5, 96),
    ],
)
def test_foundation_stand_ins_pool_as_their_models_do(name, prefix_tokens, embedding):
    clf = build_classifier(name).eval()
    assert clf.num_prefix_tokens == prefix_tokens and clf.embedding_dim == embedding
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        tokens = clf.backbone.forward_features(x)
        cls, patches = tokens[:, 0], tokens[:, prefix_tokens:]  # registers are neither CLS nor patches
        expected = torch.cat([cls, patches.mean(1)], dim=-1) if clf.pooling == "cls+mean" else cls
        assert torch.allclose(clf.embed(x), expected)
    patch = clf.backbone.patch_embed.patch_size[0]
    assert patches.shape[1] == (112 // patch) ** 2  # exactly the patches: no register among them
    if name == "tiny-h-optimus-0":
        assert (
            Preprocess.for_backbone(clf.backbone).shift[0, 0, 0, 0]
            != Preprocess.for_backbone(create_backbone("tiny-uni")).shift[0, 0, 0, 0]
        )  # its own mean/std


@pytest.mark.parametrize("name", ["efficientnetv2-b0-scratch", "resnet18-scratch", "custom-vit-scratch"])
def test_task_specific_models_take_native_128px_patches(name):
    clf = build_classifier(name).eval()
    pre = Preprocess.for_backbone(clf.backbone)
    assert pre.size == (128, 128)
    with torch.no_grad():
        assert clf(pre(torch.zeros(2, 128, 128, 3, dtype=torch.uint8))).shape == (2,)


def test_standardized_input_ignores_a_gain_and_offset_per_channel():
    """What a scanner or stain changes as gain and offset per colour channel cannot change the answer."""
    torch.manual_seed(0)  # the backbones' random initialization
    clf = build_classifier("efficientnetv2-b0-scratch", head_seed=1).eval()
    standardized = Preprocess.for_backbone(clf.backbone, "channels")
    plain = Preprocess.for_backbone(clf.backbone)
    x = torch.randint(40, 200, (3, 128, 128, 3), dtype=torch.uint8)
    gain, offset = torch.tensor([0.6, 1.3, 0.9]), torch.tensor([40.0, -20.0, 10.0])
    shifted = x.float() * gain + offset  # float pixels: no rounding, so the gain and offset are exact
    with torch.no_grad():
        # an untrained network's logits are small (~1e-3): compare at a scale well below them
        torch.testing.assert_close(clf(standardized(shifted)), clf(standardized(x)), atol=1e-6, rtol=1e-3)
        assert (clf(plain(shifted)) - clf(plain(x))).abs().max() > 1e-4


def test_equalized_detail_gives_soft_and_sharp_images_one_detail_level():
    """Blurred or unsharp-masked, an image reaches the backbone with its detail band at DETAIL_RMS, its blur kept."""
    from training.preprocess import DETAIL_RMS, binomial_blur, detail_rms, equalize_detail, standardize_channels
    from training.synthetic import synthetic_figures

    pixels, _ = synthetic_figures(2, seed=0, n_slides=2)
    x = standardize_channels(torch.from_numpy(pixels).permute(0, 3, 1, 2).float())
    versions = [x + k * (x - binomial_blur(x)) for k in (-0.6, 0.0, 1.5)]  # soft, as is, sharp
    before = torch.stack([detail_rms(v) for v in versions])
    assert before.max() > 4 * before.min()
    for v in versions:
        out = equalize_detail(v)
        torch.testing.assert_close(detail_rms(out), torch.full((2,), DETAIL_RMS), rtol=1e-4, atol=0)
        torch.testing.assert_close(equalize_detail(out), out, rtol=0, atol=1e-4)  # at DETAIL_RMS already: kept
        detail, moved = (v - binomial_blur(v)).flatten(1), (out - binomial_blur(v)).flatten(1)
        scale = (moved * detail).sum(1, keepdim=True) / detail.square().sum(1, keepdim=True)
        torch.testing.assert_close(moved, scale * detail, rtol=0, atol=1e-5)  # only the detail was scaled


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
    """Virchow's real loading path: 'hf-hub:paige-ai/Virchow' resolved in the local cache, nothing downloaded."""
    snapshot = tmp_path / "hub" / "models--paige-ai--Virchow" / "snapshots" / "0123abcd"
    _save_timm_folder(create_backbone("tiny-virchow"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = create_backbone("virchow")
    assert isinstance(model.blocks[0].mlp, GluMlp) and isinstance(model.blocks[0].mlp.act, nn.SiLU)


def test_missing_virchow_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsUnavailableError, match="hf auth login"):
        create_backbone("virchow")
    with pytest.raises(WeightsUnavailableError, match=r"config\.json"):
        create_backbone("virchow", f"local-dir:{tmp_path}")


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet'; known: .*tiny-virchow, .*virchow2") as err:
        create_backbone("resnet")
    assert all(name in str(err.value) for name in ("uni", "uni2-h", "h-optimus-0", "custom-vit-scratch"))


def test_lora_targets_attention_projections_only():
    model = apply_lora(build_classifier("tiny-virchow"), LoraSettings())
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A"))
    depth = TINY_VIRCHOW_ARGS["depth"]
    assert adapted == sorted([f"backbone.blocks.{i}.attn.{p}" for i in range(depth) for p in ("proj", "qkv")])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".atypia_head.modules_to_save." in n for n in trainable)
    assert not any("patch_embed" in n for n in trainable)


@pytest.mark.parametrize("name", ["convnext-atto-scratch", "efficientnetv2-b0-scratch", "custom-vit-scratch"])
def test_every_trainable_weight_of_a_scratch_model_gets_a_gradient(name):
    """Pooling goes through the model's own head (ConvNeXt's final norm included): no weight is left unused,
    which DDP would refuse."""
    clf = build_classifier(name)
    clf(torch.randn(2, 3, 128, 128)).sum().backward()
    unused = [n for n, p in clf.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]


def test_class_token_head_is_timms_own_one_logit_head():
    """``pooling: cls`` reads what timm's ``reset_classifier(1)`` head reads (the normed class token), so the
    same weights give the same logit; the config refuses a pooling its backbone cannot give."""
    from pydantic import ValidationError

    from training.config import TrainConfig, load_config
    from training.model import classifier_for

    cfg = load_config(REPO / "training" / "configs" / "virchow-lora-r8-cls-head.yaml")
    assert cfg.pooling == "cls" and cfg.backbone == "virchow"
    clf = classifier_for(cfg.model_copy(update={"backbone": "tiny-virchow"}).spec()).eval()
    assert clf.embedding_dim == clf.backbone.num_features  # the class token alone, not CLS + mean (2x)
    timm_model = create_backbone("tiny-virchow")
    timm_model.load_state_dict(clf.backbone.state_dict())
    timm_model.reset_classifier(1, global_pool="token")
    timm_model.head.load_state_dict(clf.atypia_head.state_dict())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(clf(x), timm_model(x).squeeze(-1), atol=1e-6)
    with pytest.raises(ValidationError, match="does not fit"):
        TrainConfig(backbone="efficientnetv2-b0-scratch", pooling="cls")
