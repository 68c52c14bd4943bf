"""A small registry of feature extractors: name -> timm model whose ``forward_features`` the classifier pools.

Foundation models are timm ViTs (pooled as CLS + mean of patch tokens); task-specific models are timm CNNs trained
from scratch at the patches' native 128 px (pooled by global average). Preprocessing (input size, interpolation,
mean/std) comes from each model's own ``pretrained_cfg``, never from constants elsewhere.

Weights are never fetched at run time. ``hf-hub:<repo>`` sources are resolved in the local Hugging Face cache
only; ``local-dir:<path>`` reads a folder holding timm's ``config.json`` and the weights file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import SwiGLUPacked
from torch import nn

log = logging.getLogger(__name__)

VIRCHOW_SOURCE = "hf-hub:paige-ai/Virchow"
# Virchow's MLP is a packed SwiGLU with SiLU; these are not in its config.json and must be passed explicitly.
VIRCHOW_LAYERS = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights of a backbone are not on this machine."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[str | None], nn.Module]  # weights source (None = the entry's default) -> timm model
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


def build_virchow(weights: str | None) -> nn.Module:
    return load_pretrained_vit(weights or VIRCHOW_SOURCE, **VIRCHOW_LAYERS)


# A Virchow-shaped stand-in: same timm class, packed SwiGLU + SiLU, LayerScale, patch 14, CLS token, same
# normalization; 3 blocks of width 96 (96 * 5.3375 -> 512 hidden, even as SwiGLU needs). LayerScale starts at 1.0
# rather than Virchow's 1e-5 init because the blocks stay frozen and random: a 1e-5 scale would mute them.
TINY_VIRCHOW_ARGS = {
    "img_size": 112,
    "patch_size": 14,
    "embed_dim": 96,
    "depth": 3,
    "num_heads": 3,
    "mlp_ratio": 5.3375,
    "init_values": 1.0,
    "num_classes": 0,
    "global_pool": "",
    "dynamic_img_size": True,
    **VIRCHOW_LAYERS,
}
TINY_VIRCHOW_CFG = {
    "input_size": (3, 112, 112),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 1.0,
    "hf_hub_id": None,
    "tag": "tiny-virchow",
}
RANDOM_INIT_SEED = 20250801


def _random_init(architecture: str, **kwargs) -> nn.Module:
    """Random init from a fixed seed, so that training and export rebuild the very same (frozen) base."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(architecture, pretrained=False, **kwargs)


def build_tiny_virchow(weights: str | None) -> nn.Module:
    if weights:
        return load_pretrained_vit(weights, **VIRCHOW_LAYERS)
    return _random_init("vit_huge_patch14_224", pretrained_cfg_overlay=TINY_VIRCHOW_CFG, **TINY_VIRCHOW_ARGS)


# Task-specific models see the 128 px crop-outs as they are: no upscaling, bilinear for other page sizes.
NATIVE_128_CFG = {
    "input_size": (3, 128, 128),
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 1.0,
}


def scratch_cnn(architecture: str) -> Callable[[str | None], nn.Module]:
    def build(weights: str | None) -> nn.Module:
        if weights:
            raise ValueError(f"{architecture} is trained from scratch here; it takes no weights source")
        return _random_init(architecture, num_classes=0, pretrained_cfg_overlay=NATIVE_128_CFG)

    return build


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("virchow", build_virchow, "Paige Virchow ViT-H/14, 632M, CLS+mean 2560-d (gated weights)"),
        BackboneSpec("tiny-virchow", build_tiny_virchow, "Virchow-shaped 3-block ViT, random init, for tests/demo"),
        BackboneSpec("resnet18-scratch", scratch_cnn("resnet18"), "ResNet-18 from scratch at native 128 px"),
        BackboneSpec(
            "efficientnetv2-b0-scratch",
            scratch_cnn("tf_efficientnetv2_b0"),
            "EfficientNetV2-B0 (the organizers' reference family, CPU-sized) from scratch at native 128 px",
        ),
    )
}


def create_backbone(name: str, weights: str | None = None) -> nn.Module:
    try:
        spec = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None
    model = spec.build(weights)
    if not hasattr(model, "forward_features") or not hasattr(model, "num_features"):
        raise TypeError(f"backbone {name!r} is not a timm model with forward_features")
    return model
