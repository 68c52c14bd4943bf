"""How raw pixels become backbone input: the one definition that training applies to its batches and export puts
in front of the folds, so that training and serving cannot disagree.

Resampling to the model's pixel size happens before, outside the graph (``contracts.resample_to_pixel_size``: the
served side reads each page's resolution from its file); everything after it is ``Preprocess``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

Standardize = Literal["none", "channels", "channels+detail"]
_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}
BINOMIAL_5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16  # a Gaussian of sigma ~1 px, normalized
# The detail band's RMS that "channels+detail" gives every figure: the breast subset's scanners have 0.13-0.20
# after channel standardization, 0.17 over all its figures (docs/results.md).
DETAIL_RMS = 0.17


class Preprocess(nn.Module):
    """uint8 RGB [N, H, W, 3], any H and W -> float [N, 3, S, S] at the backbone's input size, normalized with
    its mean and std, then with ``standardize``:

    - ``channels``: each image's channels to mean 0 and std 1 (what scanners and labs differ in as a gain and an
      offset per channel never reaches the network; for models trained from scratch);
    - ``channels+detail``: and each image's detail band (what a 5x5 binomial blur removes) to RMS ``DETAIL_RMS``
      (scanners differ most in sharpness, which scales this band).

    The standardization runs in fp32, also under autocast.
    """

    def __init__(
        self,
        input_size: Sequence[int],
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        standardize: Standardize = "none",
    ):
        super().__init__()
        if interpolation not in _TORCH_MODES:
            raise ValueError(f"unsupported interpolation {interpolation!r}")
        self.size = (int(input_size[-2]), int(input_size[-1]))
        self.mode = _TORCH_MODES[interpolation]
        self.standardize = standardize
        # (x / 255 - mean) / std, folded into one multiply-add
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    @classmethod
    def for_backbone(cls, backbone: nn.Module, standardize: Standardize = "none") -> Preprocess:
        """Input size, interpolation, mean and std from the backbone's timm ``pretrained_cfg``."""
        cfg = resolve_data_config(pretrained_cfg=backbone.pretrained_cfg)
        return cls(cfg["input_size"], cfg["interpolation"], cfg["mean"], cfg["std"], standardize)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 255] -> [N, 3, S, S].

        Always resamples, even at the target size (an exact identity then): a shape test would freeze into the
        exported graph. align_corners=False matches ONNX Resize's half_pixel mode.
        """
        kwargs = {} if self.mode == "nearest" else {"align_corners": False}
        return F.interpolate(x, size=self.size, mode=self.mode, **kwargs)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize == "none":
            return x
        if torch.is_autocast_enabled(x.device.type):  # image statistics in fp32, also under bf16 training
            with torch.autocast(x.device.type, enabled=False):
                return self.standardized(x.float())
        # channels-last, the layout the convolutions take: per-image sums follow memory order, and one layout
        # gives training, validation and the exported graph the same bits
        x = standardize_channels(x.contiguous(memory_format=torch.channels_last))
        return equalize_detail(x) if self.standardize == "channels+detail" else x

    def forward(self, pixels: torch.Tensor, after_resize: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``after_resize``: a change made to the resized image, float [N, 3, S, S] in [0, 255], before the
        normalization (the lab's blur study; the exported graph has none)."""
        x = self.resize(pixels.permute(0, 3, 1, 2).float())
        return self.standardized(self.normalize(x if after_resize is None else after_resize(x)))


def binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] smoothed by the 5x5 binomial kernel, borders reflected."""
    kernel = (BINOMIAL_5[:, None] * BINOMIAL_5[None, :]).to(x).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def standardize_channels(x: torch.Tensor) -> torch.Tensor:
    """Each image's channels of float [N, C, H, W] to mean 0 and standard deviation 1."""
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    return centred / centred.square().mean(dim=(2, 3), keepdim=True).add(1e-4).sqrt()


def fine_band(x: torch.Tensor) -> torch.Tensor:
    """The detail band of float [N, C, H, W]: the image minus its binomial blur (structure finer than ~1 px)."""
    return x - binomial_blur(x)


def detail_rms(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] -> [N]: the RMS of each image's detail band."""
    return fine_band(x).square().mean(dim=(1, 2, 3)).sqrt()


def equalize_detail(x: torch.Tensor, target: float = DETAIL_RMS) -> torch.Tensor:
    """float [N, C, H, W] -> ``x + (s - 1) * fine_band(x)``, each image's ``s >= 0`` chosen so that the result's
    own detail band has RMS exactly ``target``.

    Scaling the band by ``target / detail_rms(x)`` would not do: a difference of blurs is not a projection, so the
    result's band also holds the residue of the rest of the image. The result's band is ``a + s b`` with
    ``b = fine_band(fine_band(x))`` and ``a = fine_band(x) - b``, and ``mean((a + s b)^2) = target^2`` is a
    quadratic in ``s``: its larger root (0 where even ``s = 0`` leaves more than ``target``, as for noise).
    """
    part = fine_band(x)
    b = fine_band(part)
    a = part - b
    dims = (1, 2, 3)
    bb, ab = b.square().mean(dims), (a * b).mean(dims)
    aa_minus_target = a.square().mean(dims) - target**2
    s = (ab.square() - bb * aa_minus_target).clamp_min(0).sqrt().sub(ab).div(bb.add(1e-8)).clamp_min(0)
    return x + part * (s - 1).view(-1, 1, 1, 1)


def d4_views(x: torch.Tensor, *, h: int, w: int) -> list[torch.Tensor]:
    """The 8 flips and quarter turns (the dihedral group D4) of images with spatial dims ``h`` and ``w``: the four
    flips of ``x``, then the four of its transpose (every quarter turn is a transpose and a flip)."""
    t = x.transpose(h, w)
    return [v for y in (x, t) for v in (y, y.flip(w), y.flip(h), y.flip((h, w)))]


def model_input(
    preprocess: Preprocess,
    pixels: torch.Tensor,
    tta: bool,
    after_resize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """uint8 pages [N, H, W, 3] -> backbone input; with ``tta``, their 8 D4 views, view-major [8N, 3, S, S].

    The pages are turned before the resize, as uint8 NHWC: a page need not be square, so the upright and the
    transposed views are resized apart (turning the resized tensor exports a Transpose that ONNX Runtime's layout
    optimizer pushes into the bicubic Resize, which it then cannot run). Validation and the exported graph both
    come through here; ``after_resize`` as in ``Preprocess.forward``."""

    def prepared(x: torch.Tensor) -> torch.Tensor:  # a linear probe's Identity takes the embeddings alone
        return preprocess(x) if after_resize is None else preprocess(x, after_resize)

    if not tta:
        return prepared(pixels)
    views = d4_views(pixels, h=1, w=2)
    return torch.cat([prepared(torch.cat(views[:4])), prepared(torch.cat(views[4:]))])


def mean_over_views(probs: torch.Tensor, views: int) -> torch.Tensor:
    """[views * N] view-major -> [N], the mean over views."""
    return probs.reshape(views, -1).mean(dim=0)
