"""The training-time transforms: identities at strength 0, bounded, and drawn from the run's generator only."""

import numpy as np
import torch

from training.augment import (
    augment_color,
    augment_d4,
    augment_grayscale,
    augment_sharpness,
    augment_shift_zoom,
    augment_stain,
)


def test_d4_augmentation_only_moves_pixels():
    batch = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    out = augment_d4(batch, torch.Generator().manual_seed(0))
    for a, b in zip(batch, out, strict=True):
        assert sorted(a.flatten().tolist()) == sorted(b.flatten().tolist())
    assert not torch.equal(batch, out)


def test_stain_jitter_is_identity_at_zero_and_bounded():
    batch = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    same = augment_stain(batch, 0.0, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(same.numpy(), batch.float().numpy(), atol=1e-3)
    jittered = augment_stain(batch, 0.1, torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 255
    assert 0.5 < (jittered - batch.float()).abs().mean() < 40


def test_color_jitter_is_identity_at_zero_bounded_and_leaves_gray_gray():
    batch = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    torch.testing.assert_close(augment_color(batch, 0.0, torch.Generator().manual_seed(0)), batch.float())
    jittered = augment_color(batch, 0.2, torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 255 and not torch.allclose(jittered, batch.float())
    gray = torch.randint(60, 200, (8, 16, 16, 1), dtype=torch.uint8).expand(-1, -1, -1, 3)
    out = augment_color(gray, 0.2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[..., 0], out[..., 2])  # saturation scales colour, and gray has none
    means = out.mean(dim=(1, 2, 3)) / gray.float().mean(dim=(1, 2, 3))
    assert means.min() >= 0.8 - 1e-4 and means.max() <= 1.2 + 1e-4 and means.std() > 0.01  # brightness per image


def test_grayscale_turns_about_its_share_to_luminance_and_leaves_the_rest():
    batch = torch.randint(0, 256, (400, 4, 4, 3), dtype=torch.uint8)
    out = augment_grayscale(batch, 0.25, torch.Generator().manual_seed(0))
    gray = (out[..., 0] == out[..., 1]).all(dim=(1, 2)) & (out[..., 1] == out[..., 2]).all(dim=(1, 2))
    assert 70 < int(gray.sum()) < 130
    torch.testing.assert_close(out[~gray], batch[~gray].float())
    luminance = batch[gray].float() @ torch.tensor([0.299, 0.587, 0.114])
    torch.testing.assert_close(out[gray][..., 0], luminance)
    torch.testing.assert_close(augment_grayscale(batch, 0.0, torch.Generator().manual_seed(0)), batch.float())


def test_shift_zoom():
    batch = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    moved = augment_shift_zoom(batch, 0.1, torch.Generator().manual_seed(0))
    assert moved.shape == (6, 32, 32, 3) and moved.min() >= 0 and moved.max() <= 255
    assert not torch.allclose(moved, batch.float())


def test_sharpness_jitter_spans_blurring_to_sharpening():
    from training.preprocess import binomial_blur

    batch = torch.randint(40, 216, (64, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(augment_sharpness(batch, 0.0, torch.Generator().manual_seed(0)), batch.float())
    out = augment_sharpness(batch, 1.0, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 255

    def roughness(x):
        return (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3))

    ratio = roughness(out) / roughness(batch.float())
    assert ratio.min() < 0.6 and ratio.max() > 1.4  # some images blurred, some sharpened
    k = (torch.rand(64, 1, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1)[:1]
    x = batch[:1].float().permute(0, 3, 1, 2)
    expected = (x + k * (x - binomial_blur(x))).permute(0, 2, 3, 1).clamp(0, 255)
    torch.testing.assert_close(out[:1], expected)  # the first image, with the first draw of k
