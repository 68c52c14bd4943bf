"""A small registry of feature extractors: name -> timm model + how the classifier pools its features.

- Pathology foundation models (ViTs) with their published creation arguments and pooling: Virchow and Virchow2
  (CLS + mean of patch tokens; Virchow2's 4 register tokens are excluded from the mean), UNI, UNI2-h and
  H-optimus-0 (CLS token). Each has a ``tiny-<name>`` stand-in: the same timm class, layers, prefix tokens and
  pooling at a few blocks of small width, random init from a fixed seed, for tests and the demo.
- Task-specific models trained from scratch at the patches' native 128 px (no upscaling): CNNs pooled by global
  average, and ViTs pooled like the foundation models.

Preprocessing (input size, interpolation, mean/std) comes from each model's own ``pretrained_cfg``. Weights are
never fetched at run time: ``hf-hub:<repo>`` resolves in the local Hugging Face cache only, ``local-dir:<path>``
reads a folder holding timm's ``config.json`` and the weights file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
from timm.layers import SwiGLUPacked
from torch import nn

log = logging.getLogger(__name__)

Pooling = Literal["cls+mean", "cls", "avg"]

# Layer choices that the models' hub configs do not carry and their cards pass to timm.create_model.
VIRCHOW_LAYERS = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}
UNI2_LAYERS = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 24,
    "num_heads": 24,
    "init_values": 1e-5,
    "embed_dim": 1536,
    "mlp_ratio": 2.66667 * 2,
    "num_classes": 0,
    "no_embed_class": True,
    "reg_tokens": 8,
    "dynamic_img_size": True,
    **VIRCHOW_LAYERS,
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 20250801


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights of a backbone are not on this machine."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[str | None], nn.Module]  # weights source (None = the entry's default) -> timm model
    pooling: Pooling
    description: str


def _local_dir_of(source: str) -> Path:
    """Resolve a weights source to a folder on disk, without touching the network."""
    kind, _, ident = source.partition(":")
    if kind == "local-dir":
        path = Path(ident).expanduser()
        if not (path / "config.json").is_file():
            raise WeightsUnavailableError(f"{path}: no timm config.json there (expected config.json + weights)")
        return path
    if kind == "hf-hub":
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo_id=ident, local_files_only=True))
        except LocalEntryNotFoundError:
            raise WeightsUnavailableError(
                f"weights for {ident} are not in the local Hugging Face cache. On a machine with internet, accept "
                f"the model's terms on huggingface.co/{ident}, run `hf auth login` with a read token, then "
                f"`hf download {ident}` (or copy the snapshot folder and pass weights: local-dir:/path/to/it)"
            ) from None
    raise ValueError(f"weights source must start with 'hf-hub:' or 'local-dir:', got {source!r}")


def load_pretrained_vit(source: str, **layer_kwargs) -> nn.Module:
    """timm model from a local folder or the HF cache (offline), with its pretrained_cfg attached."""
    folder = _local_dir_of(source)
    log.info("loading backbone weights from %s", folder)
    return timm.create_model(f"local-dir:{folder}", pretrained=True, **layer_kwargs)


def _random_init(architecture: str, **kwargs) -> nn.Module:
    """Random init from a fixed seed, so that training and export rebuild the very same (frozen) base."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(architecture, pretrained=False, **kwargs)


@dataclass(frozen=True)
class FoundationModel:
    name: str
    source: str  # default weights source
    layers: dict  # creation arguments beyond the hub config
    pooling: Pooling
    description: str
    tiny_architecture: str  # timm entry the stand-in is built from, with tiny_args overriding its size
    tiny_args: dict
    tiny_cfg: dict

    def build(self, weights: str | None) -> nn.Module:
        return load_pretrained_vit(weights or self.source, **self.layers)

    def build_tiny(self, weights: str | None) -> nn.Module:
        if weights:
            return load_pretrained_vit(weights, **self.layers)
        return _random_init(self.tiny_architecture, pretrained_cfg_overlay=self.tiny_cfg, **self.tiny_args)


def _tiny_cfg(name: str, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    return {
        "input_size": (3, size, size),
        "interpolation": "bicubic",
        "mean": mean,
        "std": std,
        "crop_pct": 1.0,
        "hf_hub_id": None,
        "tag": name,
    }


# Stand-ins: a few blocks of small width. Widths are chosen so that SwiGLU's hidden size is even (96 * 5.3375 ->
# 512). LayerScale starts at 1.0 rather than 1e-5 because their blocks stay frozen and random under LoRA: a 1e-5
# scale would mute them.
_TINY = {"depth": 3, "num_heads": 3, "init_values": 1.0, "num_classes": 0, "dynamic_img_size": True}
TINY_VIRCHOW_ARGS = {
    "img_size": 112,
    "patch_size": 14,
    "embed_dim": 96,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    **_TINY,
    **VIRCHOW_LAYERS,
}
TINY_VIRCHOW_CFG = _tiny_cfg("tiny-virchow", 112)

FOUNDATION_MODELS = (
    FoundationModel(
        "virchow",
        "hf-hub:paige-ai/Virchow",
        VIRCHOW_LAYERS,
        "cls+mean",
        "Paige Virchow ViT-H/14, 632M, CLS + mean patch token = 2560-d (gated)",
        "vit_huge_patch14_224",
        TINY_VIRCHOW_ARGS,
        TINY_VIRCHOW_CFG,
    ),
    FoundationModel(
        "virchow2",
        "hf-hub:paige-ai/Virchow2",
        VIRCHOW_LAYERS,
        "cls+mean",
        "Paige Virchow2 ViT-H/14 with 4 registers, CLS + mean patch token = 2560-d (gated)",
        "vit_huge_patch14_224",
        {**TINY_VIRCHOW_ARGS, "reg_tokens": 4},
        _tiny_cfg("tiny-virchow2", 112),
    ),
    FoundationModel(
        "uni",
        "hf-hub:MahmoodLab/UNI",
        {"init_values": 1e-5, "dynamic_img_size": True},
        "cls",
        "MahmoodLab UNI ViT-L/16, CLS = 1024-d (gated)",
        "vit_large_patch16_224",
        {"img_size": 112, "embed_dim": 96, **_TINY},
        _tiny_cfg("tiny-uni", 112),
    ),
    FoundationModel(
        "uni2-h",
        "hf-hub:MahmoodLab/UNI2-h",
        UNI2_LAYERS,
        "cls",
        "MahmoodLab UNI2-h ViT-H/14, SwiGLU, 8 registers, CLS = 1536-d (gated)",
        "vit_huge_patch14_224",
        {**UNI2_LAYERS, "img_size": 112, "embed_dim": 96, **_TINY},
        _tiny_cfg("tiny-uni2-h", 112),
    ),
    FoundationModel(
        "h-optimus-0",
        "hf-hub:bioptimus/H-optimus-0",
        {"init_values": 1e-5, "dynamic_img_size": False},
        "cls",
        "Bioptimus H-optimus-0 ViT-g/14 with 4 registers, CLS = 1536-d, its own mean/std (gated)",
        "vit_giant_patch14_reg4_dinov2",
        {"img_size": 112, "embed_dim": 96, "mlp_ratio": 4.0, **_TINY},
        _tiny_cfg("tiny-h-optimus-0", 112, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
    ),
)

# Virchow's block design (SwiGLU-packed MLP, SiLU, patch 14 at 224 px, CLS + mean pooling) with random weights, at
# ViT-B width and at Virchow's own size (632M parameters): what benchmarks time when the real weights are not here.
# LayerScale starts at 1.0 for the reason the stand-ins' does; ViT-B's SwiGLU hidden size is 768 * 16/3 = 4096.
VIRCHOW_SHAPED = {
    "vit-base-random": ("vit_base_patch16_224", {"patch_size": 14, "mlp_ratio": 16 / 3}),
    "virchow-size-random": ("vit_huge_patch14_224", {"mlp_ratio": 5.3375}),
}


def virchow_shaped(architecture: str, size_args: dict) -> Callable[[str | None], nn.Module]:
    def build(weights: str | None) -> nn.Module:
        if weights:
            raise ValueError(f"{architecture} with Virchow's blocks is a random-weight benchmark model")
        return _random_init(
            architecture,
            img_size=224,
            init_values=1.0,
            num_classes=0,
            global_pool="",
            dynamic_img_size=True,
            pretrained_cfg_overlay=_tiny_cfg(architecture, 224),
            **size_args,
            **VIRCHOW_LAYERS,
        )

    return build


# Task-specific models see the 128 px crop-outs as they are: no upscaling, bilinear for other page sizes.
NATIVE_128_CFG = {
    "input_size": (3, 128, 128),
    "interpolation": "bilinear",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "crop_pct": 1.0,
}


def from_scratch(architecture: str, **kwargs) -> Callable[[str | None], nn.Module]:
    def build(weights: str | None) -> nn.Module:
        if weights:
            raise ValueError(f"{architecture} is trained from scratch here; it takes no weights source")
        return _random_init(architecture, num_classes=0, pretrained_cfg_overlay=NATIVE_128_CFG, **kwargs)

    return build


# The small-patch study's model: a ViT designed for 128 px crop-outs, 8 px patches (16 x 16 tokens), no upscaling.
CUSTOM_VIT_ARGS = {"img_size": 128, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3, "global_pool": ""}

SCRATCH_MODELS = (
    BackboneSpec(
        "efficientnetv2-b0-scratch",
        from_scratch("tf_efficientnetv2_b0"),
        "avg",
        "EfficientNetV2-B0 (the organizers' reference family, CPU-sized)",
    ),
    BackboneSpec(
        "efficientnetv2-m-scratch",
        from_scratch("tf_efficientnetv2_m"),
        "avg",
        "EfficientNetV2-M, the organizers' reference model",
    ),
    BackboneSpec("resnet18-scratch", from_scratch("resnet18"), "avg", "ResNet-18"),
    BackboneSpec("convnext-atto-scratch", from_scratch("convnext_atto"), "avg", "ConvNeXt-Atto"),
    BackboneSpec(
        "vit-small-scratch",
        from_scratch("vit_small_patch16_224", img_size=128, global_pool=""),
        "cls+mean",
        "plain ViT-S/16 at 128 px (8 x 8 tokens)",
    ),
    BackboneSpec(
        "custom-vit-scratch",
        from_scratch("vit_small_patch16_224", **CUSTOM_VIT_ARGS),
        "cls+mean",
        "the small-patch study's CustomViT: 8 px patches, 6 blocks of width 192",
    ),
)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        *(BackboneSpec(fm.name, fm.build, fm.pooling, fm.description) for fm in FOUNDATION_MODELS),
        *(
            BackboneSpec(f"tiny-{fm.name}", fm.build_tiny, fm.pooling, f"{fm.name}-shaped stand-in, random init")
            for fm in FOUNDATION_MODELS
        ),
        *SCRATCH_MODELS,
        *(
            BackboneSpec(name, virchow_shaped(arch, size), "cls+mean", f"{arch} with Virchow's blocks, random init")
            for name, (arch, size) in VIRCHOW_SHAPED.items()
        ),
    )
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None


def create_backbone(name: str, weights: str | None = None) -> nn.Module:
    model = backbone_spec(name).build(weights)
    if not hasattr(model, "forward_features") or not hasattr(model, "num_features"):
        raise TypeError(f"backbone {name!r} is not a timm model with forward_features")
    return model
