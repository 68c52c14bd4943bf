"""process.py, the container entry point: valid answers on every kind of stack, clean failures on bad input."""

import numpy as np
import pytest
import torch
from conftest import REPO, answer_for, case_with_file, red_mean_model, shared_path
from PIL import Image

import process
import reader
from contracts import ANSWER_FILENAME, INPUT_INTERFACE, resample_to_pixel_size, validate_answer
from training.synthetic import write_case


def test_organizers_sample_case_is_answered(model_dir, tmp_path):
    case = shared_path("gc-sample", "input")
    answer, result = answer_for(case, model_dir, tmp_path)
    validate_answer(answer, n_pages=16)
    assert "16 page(s)" in result.stderr and "CPUExecutionProvider" in result.stderr


def test_committed_sample_case_is_answered(model_dir, tmp_path):
    answer, _ = answer_for(REPO / "test" / "input", model_dir, tmp_path)
    validate_answer(answer, n_pages=16)


@pytest.mark.parametrize(("n_pages", "fmt"), [(1, "tiff"), (7, "tif"), (16, "tiff"), (5, "mha"), (1, "mha")])
def test_stacks_of_every_size_and_format(model_dir, pages, tmp_path, n_pages, fmt):
    write_case(tmp_path / "in", pages[:n_pages], fmt=fmt)
    answer, _ = answer_for(tmp_path / "in", model_dir, tmp_path / "out")
    validate_answer(answer, n_pages=n_pages)
    assert all(type(e["confidence"]) is float for e in answer)


def test_page_order_is_kept(model_dir, pages, tmp_path):
    write_case(tmp_path / "fwd", pages[:8])
    write_case(tmp_path / "rev", pages[:8][::-1])
    forward, _ = answer_for(tmp_path / "fwd", model_dir, tmp_path / "o1")
    backward, _ = answer_for(tmp_path / "rev", model_dir, tmp_path / "o2")
    assert forward == backward[::-1]
    assert len({e["confidence"] for e in forward}) > 1  # distinct pages, so order is really tested


def test_tiff_and_mha_of_the_same_pages_agree(model_dir, pages, tmp_path):
    write_case(tmp_path / "t", pages[:6], fmt="tiff")
    write_case(tmp_path / "m", pages[:6], fmt="mha")
    from_tiff, _ = answer_for(tmp_path / "t", model_dir, tmp_path / "o1")
    from_mha, _ = answer_for(tmp_path / "m", model_dir, tmp_path / "o2")
    assert from_tiff == from_mha


def test_confidence_polarity_and_threshold_with_a_known_model(tmp_path):
    model_dir = red_mean_model(tmp_path / "model")
    reds = [25, 230, 120, 140, 255, 0]
    stack = np.zeros((len(reds), 128, 128, 3), np.uint8)
    stack[..., 0] = np.array(reds, np.uint8)[:, None, None]
    write_case(tmp_path / "in", stack)
    answer, _ = answer_for(tmp_path / "in", model_dir, tmp_path / "out")
    expected = np.clip(np.array(reds) / 255, 1e-6, 1 - 1e-6)
    np.testing.assert_allclose([e["confidence"] for e in answer], expected, atol=1e-4)  # float32 logit round trip
    assert [e["class"] for e in answer] == ["atypical" if p >= 0.5 else "normal" for p in expected]
    assert [e["class"] for e in answer][:2] == ["normal", "atypical"]


def test_mixed_modes_and_sizes_in_one_stack(model_dir, pages, tmp_path):
    image_dir = tmp_path / "in" / "images" / INPUT_INTERFACE
    image_dir.mkdir(parents=True)
    rgb = [Image.fromarray(p) for p in pages[:4]]
    mixed = [rgb[0].convert("RGBA"), rgb[1].convert("L"), rgb[2].convert("P"), rgb[3].resize((100, 140))]
    mixed[0].save(image_dir / "mixed.tiff", save_all=True, append_images=mixed[1:])
    answer, _ = answer_for(tmp_path / "in", model_dir, tmp_path / "out")
    validate_answer(answer, n_pages=4)


def test_a_grey_mha_is_read_as_grey_pages_even_when_its_width_is_3(model_dir, tmp_path):
    import SimpleITK as sitk

    case = case_with_file(tmp_path, "placeholder", b"")
    (case / "images" / INPUT_INTERFACE / "placeholder").unlink()
    grey = sitk.GetImageFromArray(np.zeros((5, 128, 3), np.uint8))  # scalar pixels, [N=5, H=128, W=3]
    sitk.WriteImage(grey, str(case / "images" / INPUT_INTERFACE / "grey.mha"))
    answer, result = answer_for(case, model_dir, tmp_path / "out")
    validate_answer(answer, n_pages=5)  # five grey pages of 128 x 3, not 5 x 128 RGB
    assert "5 of 5 page(s) are grey" in result.stderr and "3x128 far from the challenge's 128x128" in result.stderr


def test_answer_is_readable_by_other_users(model_dir, tmp_path):
    answer_for(REPO / "test" / "input", model_dir, tmp_path)
    assert (tmp_path / ANSWER_FILENAME).stat().st_mode & 0o777 == 0o644


def test_the_model_folder_in_use_is_logged(model_dir, tmp_path):
    _, result = answer_for(REPO / "test" / "input", model_dir, tmp_path)
    assert f"model folder {model_dir} (--model)" in result.stderr
    assert "in int8 on CPUExecutionProvider" in result.stderr  # --device cpu serves the int8 graph that passed parity


def test_device_auto_serves_the_graph_of_the_provider_that_loaded(model_dir):
    """onnxruntime-gpu lists CUDA even where it cannot load it: --device auto then runs the CPU's graph (int8),
    not the CUDA graph (fp16) on the CPU provider."""
    from process import OnnxEnsemble

    ensemble = OnnxEnsemble(model_dir, "auto")
    device = "cuda" if ensemble.provider == "CUDAExecutionProvider" else "cpu"
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert ensemble.precision == ensemble.manifest.serve[device] == {"cuda": "fp16", "cpu": "int8"}[device]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "I;16", "CMYK", "1"])
def test_pages_of_any_mode_become_rgb(model_dir, pages, tmp_path, mode):
    image_dir = tmp_path / "in" / "images" / INPUT_INTERFACE
    image_dir.mkdir(parents=True)
    converted = [
        Image.fromarray(p).convert("L").convert(mode) if mode == "I;16" else Image.fromarray(p).convert(mode)
        for p in pages[:3]
    ]
    converted[0].save(image_dir / "stack.tif", save_all=True, append_images=converted[1:])
    answer, _ = answer_for(tmp_path / "in", model_dir, tmp_path / "out")
    validate_answer(answer, n_pages=3)


def framed_pages() -> np.ndarray:
    """Pages whose red is a 16 px frame: magnifying crops the frame, so the red-mean model's answer moves."""
    pages = np.zeros((2, 128, 128, 3), np.uint8)
    pages[:, :16, :, 0] = pages[:, -16:, :, 0] = pages[:, :, :16, 0] = pages[:, :, -16:, 0] = 255
    pages[1, ..., 1] = 90  # a second, distinct page
    return pages


@pytest.mark.parametrize("fmt", ["tiff", "mha"])
def test_pages_are_resampled_from_their_recorded_pixel_size_to_the_models(tmp_path, fmt):
    model = red_mean_model(tmp_path / "model", pixel_size_um=0.23)
    pages = framed_pages()
    expected = {um: resample_to_pixel_size(pages, um, 0.23)[..., 0].mean(axis=(1, 2)) / 255 for um in (0.25, 0.23)}
    assert expected[0.25][0] < expected[0.23][0] - 0.03  # the test can tell resampled from not
    for um in (0.25, 0.23):
        write_case(tmp_path / f"in-{um}", pages, fmt=fmt, pixel_size_um=um)
        answer, result = answer_for(tmp_path / f"in-{um}", model, tmp_path / f"out-{um}")
        np.testing.assert_allclose([e["confidence"] for e in answer], expected[um], atol=1e-4)
        assert f"at {um:.3f} um/px" in result.stderr and "trained at 0.23 um/px" in result.stderr


def test_pages_that_record_no_pixel_size_are_served_as_they_are_with_a_warning(tmp_path):
    model = red_mean_model(tmp_path / "model", pixel_size_um=0.23)
    pages = framed_pages()
    write_case(tmp_path / "in", pages)
    answer, result = answer_for(tmp_path / "in", model, tmp_path / "out")
    np.testing.assert_allclose([e["confidence"] for e in answer], pages[..., 0].mean(axis=(1, 2)) / 255, atol=1e-4)
    assert "WARNING 2 of 2 page(s) record no pixel size" in result.stderr


def test_a_model_without_a_pixel_size_serves_every_page_as_it_is(tmp_path):
    pages = framed_pages()
    write_case(tmp_path / "in", pages, pixel_size_um=0.25)
    answer, _ = answer_for(tmp_path / "in", red_mean_model(tmp_path / "model"), tmp_path / "out")
    np.testing.assert_allclose([e["confidence"] for e in answer], pages[..., 0].mean(axis=(1, 2)) / 255, atol=1e-4)


@pytest.mark.parametrize(
    ("tags", "um"),
    [
        ({282: 101_600, 283: 101_600}, 0.25),  # dots per inch, TIFF's default unit
        ({296: 3, 282: 40_000, 283: 50_000}, 0.225),  # per centimetre; X and Y averaged
        ({296: 1, 282: 40_000, 283: 40_000}, None),  # no unit
        ({282: 72, 283: 72}, None),  # a 72 dpi default, no scan's resolution
        ({}, None),
        ({282: 0, 283: 0}, None),
        ({282: (1, 2), 283: 3}, None),  # damaged
    ],
)
def test_tiff_resolution_tags_give_a_plausible_pixel_size_or_none(tags, um):
    got = reader.tiff_pixel_size(tags)
    assert got == pytest.approx(um) if um is not None else got is None


def test_the_organizers_sample_stack_records_its_pixel_size():
    case = reader.read_stack(process.find_stack(shared_path("gc-sample", "input")))
    assert len(case.pixel_sizes_um) == 16
    assert all(um == pytest.approx(0.2487, abs=1e-3) for um in case.pixel_sizes_um)  # a 40x scan's


def test_a_page_gets_the_same_answer_alone_and_inside_its_stack(model_dir, pages, tmp_path):
    """The int8 graph quantizes activations over a run: pages run alone, so neighbours cannot move an answer."""
    from process import OnnxEnsemble

    ensemble = OnnxEnsemble(model_dir, "cpu")
    assert ensemble.precision == "int8"
    in_stack = ensemble.predict(list(pages))
    alone = np.array([ensemble.predict([page])[0] for page in pages])
    assert np.abs(in_stack - alone).max() <= 1e-6
    write_case(tmp_path / "one", pages[3:4])
    write_case(tmp_path / "all", pages)
    one, _ = answer_for(tmp_path / "one", model_dir, tmp_path / "o1")
    everything, _ = answer_for(tmp_path / "all", model_dir, tmp_path / "o2")
    assert abs(one[0]["confidence"] - everything[3]["confidence"]) <= 1e-6
