"""``python -m training probe``: each rendering of the figures, served through the container's path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import red_mean_model, run_cli

from contracts import resample_to_pixel_size
from training.data import read_dataset
from training.evaluate import domain_scores
from training.lab.describe import jpeg_grid
from training.lab.probe import RENDERINGS, as_jpeg, defocused, probe, stained, with_gamma, with_noise
from training.synthetic import synthetic_figures, write_midog25


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe") / "data"
    write_midog25(root, n=48, seed=3, n_slides=6)
    return root


def test_renderings_are_seeded_keep_the_page_and_change_it_as_named():
    page = synthetic_figures(1, seed=0, n_slides=1)[0][0]  # an H&E-like figure
    for render in (as_jpeg(75), with_noise(4.0), defocused(0.7)):
        a, b = render(page, np.random.default_rng(1)), render(page, np.random.default_rng(1))
        assert a.shape == page.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, page)
    np.testing.assert_array_equal(with_gamma(1.0)(page, None), page)
    assert with_gamma(0.8)(page, None).mean() > page.mean() > with_gamma(1.25)(page, None).mean()
    assert with_gamma(0.8)(np.array([0, 255], dtype=np.uint8), None).tolist() == [0, 255]
    np.testing.assert_array_equal(stained(0, 1.0)(page, None), page)  # deconvolution and back: the page itself
    # the stains' absorption: more hematoxylin (blue-purple) darkens every channel, blue least; more eosin (pink)
    # darkens green above all
    drops = [page.mean(axis=(0, 1)) - stained(k, 1.2)(page, None).mean(axis=(0, 1)) for k in (0, 1)]
    assert (drops[0] > 0).all() and np.argmin(drops[0]) == 2
    assert (drops[1] > 0).all() and drops[1][1] > 3 * max(drops[1][0], drops[1][2])
    sharpness = [np.abs(np.diff(x.astype(float), axis=1)).mean() for x in (page, defocused(0.7)(page, None))]
    assert sharpness[1] < 0.9 * sharpness[0]
    noise = with_noise(4.0)(page, np.random.default_rng(1)).astype(float) - page
    assert 3.5 < noise.std() < 4.5
    # JPEG: close to the page, with a block grid that describe's measure finds, at another offset per seed
    jpegs = [as_jpeg(50)(page, np.random.default_rng(s)) for s in range(4)]
    assert all(np.abs(j.astype(float) - page).mean() < 4 for j in jpegs)
    assert len({j.tobytes() for j in jpegs}) > 1
    grid = jpeg_grid(np.stack([page, *jpegs]).astype(np.float32).mean(axis=-1))
    assert grid[0] < 1.1 and (grid[1:] > 1.2).all()


def test_probe_moves_a_known_model_as_each_rendering_should(dataset, tmp_path):
    """The red-mean model's P(atypical) is a page's mean red / 255: what each rendering does to it is known."""
    from training.pixels import at_pixel_size
    from training.predict import figures_to_score

    model = red_mean_model(tmp_path / "model", pixel_size_um=0.23)
    results = probe(model, dataset)
    assert list(results) == [r.name for r in RENDERINGS]
    figures, pixels, sizes, _ = figures_to_score(dataset)
    # as scanned: each figure resampled from its scanner's pixel size to the model's 0.23 um/px, its mean red
    red = at_pixel_size(figures, pixels, 0.23)[..., 0].mean(axis=(1, 2)) / 255
    scanned = results["as scanned"]
    labels = np.array([f.label for f in figures])
    assert scanned == pytest.approx(domain_scores(labels, (red >= 0.5).astype(int), red), abs=1e-5)
    assert results["gamma 0.8"]["mean_prob_normal"] > scanned["mean_prob_normal"] + 0.02
    assert results["gamma 1.25"]["mean_prob_normal"] < scanned["mean_prob_normal"] - 0.02
    # more hematoxylin darkens red most of the three channels, more eosin barely (it absorbs green)
    assert results["hematoxylin x1.2"]["mean_prob_normal"] < scanned["mean_prob_normal"] - 0.01
    assert results["eosin x1.2"]["mean_prob_normal"] == pytest.approx(scanned["mean_prob_normal"], abs=0.01)
    # a pixel size recorded 8% off: each figure served as if scanned at that size, resampled from it to 0.23
    for name, factor in (("pixel size -8%", 0.92), ("pixel size +8%", 1.08)):
        red = np.array(
            [
                resample_to_pixel_size(p[None], s * factor, 0.23)[0, ..., 0].mean() / 255
                for p, s in zip(pixels, sizes, strict=True)
            ]
        )
        assert results[name] == pytest.approx(domain_scores(labels, (red >= 0.5).astype(int), red), abs=1e-5)
        assert results[name]["mean_prob_normal"] != scanned["mean_prob_normal"]
    for name in ("JPEG quality 75", "JPEG quality 50", "noise sd 4", "defocus 0.7 px"):  # the mean red barely moves
        assert results[name]["mean_prob_normal"] == pytest.approx(scanned["mean_prob_normal"], abs=0.01)
    assert all(row["n"] == len(figures) for row in results.values())


def test_cli_prints_every_rendering_and_writes_json(dataset, tmp_path):
    model = red_mean_model(tmp_path / "model")
    out = tmp_path / "probe.json"
    result = run_cli("-m", "training", "probe", model, "--data-root", dataset, "--scanner", "Aperio CS2", "--json", out)
    lines = result.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines[1:]] == [r.name for r in RENDERINGS]
    written = json.loads(out.read_text())
    on_cs2 = [f for f in read_dataset(dataset) if f.scanner == "Aperio CS2"]
    assert written["as scanned"]["n"] == len(on_cs2) > 0
    # a model without a pixel size serves every page as it is: the pixel-size renderings change nothing
    assert written["pixel size +8%"] == written["as scanned"] == written["pixel size -8%"]
