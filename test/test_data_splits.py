"""The dataset readers and the fold strategies, on the real breast subset and the official tables."""

import csv
import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
from conftest import shared_path

from training.config import TrainConfig
from training.data import MIDOG25_COLUMNS, MIDOG25_CSV, normalize_scanner, read_midog25
from training.figure import DataError
from training.pixels import at_pixel_size, decode_figures
from training.run import RunFolder
from training.splits import load_or_create_splits, make_folds, slide_grouped_folds
from training.synthetic import write_midog25


@pytest.fixture(scope="module")
def breast_subset():
    return read_midog25(shared_path("midog25-breast-subset"))


def test_real_subset_reads_with_labels_slides_and_scanners(breast_subset):
    assert len(breast_subset) == 1721
    assert sum(f.label for f in breast_subset) == 404  # AMF = atypical = 1
    assert len({f.slide for f in breast_subset}) == 135
    assert set(Counter(f.scanner for f in breast_subset)) == {"Hamamatsu XR", "Hamamatsu S360", "Aperio CS2"}


def test_real_patches_decode_to_128px_rgb(breast_subset):
    pixels = decode_figures(breast_subset[:32])
    assert pixels.shape == (32, 128, 128, 3) and pixels.dtype == np.uint8
    assert 60 < pixels.mean() < 240  # real H&E, not an empty buffer


def test_describe_shows_the_real_scanners_differ_most_in_sharpness(breast_subset, tmp_path):
    from conftest import run_cli

    out = tmp_path / "domains.json"
    result = run_cli("-m", "training", "describe", "--data-root", shared_path("midog25-breast-subset"), "--json", out)
    assert "Hamamatsu S360" in result.stdout and "sharpness" in result.stdout
    domains = json.loads(out.read_text())
    assert {d: v["figures"] for d, v in domains.items()} == {
        "Aperio CS2": 688,
        "Hamamatsu S360": 582,
        "Hamamatsu XR": 451,
    }
    sharp = {d: v["sharpness"] for d, v in domains.items()}
    assert sharp["Aperio CS2"] > 1.5 * sharp["Hamamatsu S360"] and sharp["Hamamatsu XR"] > sharp["Hamamatsu S360"]
    detail = {d: v["detail_rms"] for d, v in domains.items()}  # the same order once colour is standardized
    assert detail["Aperio CS2"] > 1.4 * detail["Hamamatsu S360"] and detail["Hamamatsu XR"] > detail["Hamamatsu S360"]
    mid = {d: v["mid_band_rms"] for d, v in domains.items()}  # what is left once the detail band is equalized
    assert mid["Aperio CS2"] > 1.05 * mid["Hamamatsu S360"]
    grid = {d: v["jpeg_grid"] for d, v in domains.items()}  # both Hamamatsu scanners store JPEG blocks
    assert grid["Hamamatsu S360"] > grid["Hamamatsu XR"] > 1.15 and 1.0 < grid["Aperio CS2"] < 1.1
    xr = [f for f in breast_subset if f.scanner == "Hamamatsu XR"]
    gray = decode_figures(xr).astype(np.float64).mean(axis=-1)  # independently: neighbour differences, by hand
    by_hand = np.mean([np.abs(g[1:] - g[:-1]).mean() + np.abs(g[:, 1:] - g[:, :-1]).mean() for g in gray])
    assert abs(domains["Hamamatsu XR"]["sharpness"] - by_hand) < 1e-3
    assert abs(domains["Hamamatsu XR"]["atypical_share"] - np.mean([f.label for f in xr])) < 1e-12
    # as the model sees them (pixel_size_um 0.23): the Hamamatsu scanners' figures are already at 0.23 um/px and
    # stay as they are; Aperio CS2's (0.25) are magnified, which softens them, and keep more mid-band contrast
    run_cli(
        "-m",
        "training",
        "describe",
        "--data-root",
        shared_path("midog25-breast-subset"),
        "--json",
        out,
        "--pixel-size-um",
        "0.23",
    )
    resampled = json.loads(out.read_text())
    for scanner in ("Hamamatsu S360", "Hamamatsu XR"):
        assert resampled[scanner] == domains[scanner]
    assert resampled["Aperio CS2"]["sharpness"] < 0.9 * domains["Aperio CS2"]["sharpness"]
    assert resampled["Aperio CS2"]["mid_band_rms"] > 1.1 * resampled["Hamamatsu S360"]["mid_band_rms"]


def test_official_full_csv_has_the_columns_the_reader_needs():
    path = shared_path("metadata", "MIDOG25_Atypical_Classification_Train_Set.full.csv")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == MIDOG25_COLUMNS
        rows = list(reader)
    assert len(rows) == 11937
    assert {r["majority"] for r in rows} == {"AMF", "NMF"}
    assert len({r["Tumor"] for r in rows}) == 7


@pytest.mark.parametrize("spelling", ["Hammamatsu XR", "Hamammatsu XR", "Hamamatsu XR", " hammamatsu XR "])
def test_scanner_spellings_are_normalized(spelling):
    assert normalize_scanner(spelling) == "Hamamatsu XR"


def test_real_subset_folds_are_grouped_by_slide_and_stratified(breast_subset):
    folds = slide_grouped_folds(breast_subset, n_folds=3, seed=42)
    by_id = {f.image_id: f for f in breast_subset}
    assert sorted(i for fold in folds for i in fold) == sorted(by_id)  # each figure validated exactly once
    slides = [{by_id[i].slide for i in fold} for fold in folds]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not slides[a] & slides[b], "a slide straddles two folds"
    overall = np.mean([f.label for f in breast_subset])
    for fold in folds:
        assert abs(np.mean([by_id[i].label for i in fold]) - overall) < 0.05
    assert folds == slide_grouped_folds(list(reversed(breast_subset)), n_folds=3, seed=42)  # order-independent


def test_splits_are_persisted_and_reused(tmp_path, breast_subset):
    folds = load_or_create_splits(RunFolder(tmp_path), breast_subset, TrainConfig(seed=1))
    saved = json.loads(RunFolder(tmp_path).splits.read_text())
    assert saved["val_ids"] == folds and saved["seed"] == 1 and saved["split"] == "slide"
    run = RunFolder(tmp_path)
    assert load_or_create_splits(run, breast_subset, TrainConfig(seed=999)) == folds  # reused, not redrawn
    with pytest.raises(ValueError, match="other data"):
        load_or_create_splits(RunFolder(tmp_path), breast_subset[:100], TrainConfig(seed=1))


def test_leave_one_scanner_out_holds_out_exactly_one_scanner(breast_subset):
    folds = make_folds(breast_subset, TrainConfig(split="domain", domain="scanner", folds=3))
    by_id = {f.image_id: f for f in breast_subset}
    held_out = [{by_id[i].scanner for i in fold} for fold in folds]
    assert held_out == [{"Aperio CS2"}, {"Hamamatsu S360"}, {"Hamamatsu XR"}]
    assert sum(map(len, folds)) == len(breast_subset)
    with pytest.raises(ValueError, match="set folds: 3"):
        make_folds(breast_subset, TrainConfig(split="domain", domain="scanner", folds=4))


def test_random_folds_are_stratified_but_leak_slides(breast_subset):
    folds = make_folds(breast_subset, TrainConfig(split="random", seed=0))
    by_id = {f.image_id: f for f in breast_subset}
    slides = [{by_id[i].slide for i in fold} for fold in folds]
    assert slides[0] & slides[1], "image-level folds share slides: why 'slide' is the default"
    overall = np.mean([f.label for f in breast_subset])
    assert all(abs(np.mean([by_id[i].label for i in fold]) - overall) < 0.02 for fold in folds)


def _tiny_dataset(tmp_path, n=12):
    write_midog25(tmp_path, n=n, seed=0, n_slides=4)
    return tmp_path


def _rewrite_csv(root, edit):
    path = root / MIDOG25_CSV
    rows = list(csv.reader(path.open()))
    edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_bad_labels_and_duplicates_are_named(tmp_path):
    root = _tiny_dataset(tmp_path)
    _rewrite_csv(root, lambda rows: rows[3].__setitem__(-1, "MAYBE"))
    with pytest.raises(DataError, match=r"row 4: 'MAYBE'"):
        read_midog25(root)
    _rewrite_csv(root, lambda rows: (rows[3].__setitem__(-1, "NMF"), rows[5].__setitem__(0, rows[2][0])))
    with pytest.raises(DataError, match=r"different content: 1\.png"):
        read_midog25(root)


def test_missing_wrong_size_and_unreadable_images_are_named(tmp_path):
    from PIL import Image

    root = _tiny_dataset(tmp_path)
    (root / "images" / "1.png").unlink()
    Image.new("RGB", (64, 64)).save(root / "images" / "2.png")
    (root / "images" / "3.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="3 bad image") as err:
        decode_figures(read_midog25(root))
    assert "1.png" in str(err.value) and "2.png: size (64, 64)" in str(err.value) and "3.png" in str(err.value)


def test_folder_without_the_csv_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="MIDOG25 layout"):
        read_midog25(tmp_path)


def _amibr_from_breast_subset(root, breast_subset, tupac_rows=5):
    """An AMi-Br-layout folder built from the real subset: its MIDOG21 rows are MIDOG25's figures (same slide and
    coordinates), plus a few TUPAC16 rows that MIDOG25 does not have."""
    import os

    rows = []
    for uid, f in enumerate(breast_subset):  # slide '2' for '002.tiff', coordinates rounded one pixel off
        x, y = f.coordinates
        rows.append(("MIDOG21", uid, str(int(f.slide.split(".")[0])), (x + 1, y - 1), f.votes, f))
    for uid, f in enumerate(breast_subset[:tupac_rows]):
        rows.append(("TUPAC16", uid, f"TUPAC-{uid:03d}", (uid, uid), f.votes, f))
    for kind in ("normal", "atypical"):
        (root / "patches" / kind).mkdir(parents=True)
    with (root / "AMI-BR.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            [
                "slide",
                "dataset",
                "uid",
                "x",
                "y",
                "expert1_label",
                "expert2_label",
                "expert1_atypical",
                "expert2_atypical",
                "expert3_atypical",
                "majority_atypical",
            ]
        )
        for dataset, uid, slide, (x, y), votes, f in rows:
            calls = [str(bool(v)) for v in votes] + [""] * (3 - len(votes))
            writer.writerow([slide, dataset, uid, x, y, "", "", *calls, str(bool(f.label))])
            kind = "atypical" if f.label else "normal"
            os.symlink(f.path, root / "patches" / kind / f"{dataset}_{uid}.png")
    return root


def test_amibr_reads_and_its_midog21_figures_merge_away(tmp_path, breast_subset):
    from training.data import merge_datasets, read_amibr, read_dataset

    root = _amibr_from_breast_subset(tmp_path / "amibr", breast_subset)
    amibr = read_dataset(root)
    assert len(amibr) == len(breast_subset) + 5
    assert [f.label for f in amibr[: len(breast_subset)]] == [f.label for f in breast_subset]
    assert {f.source for f in amibr} == {"AMi-Br"} and amibr[0].image_id.startswith("AMi-Br:")
    pixels = decode_figures(amibr[:4])  # patches/{normal,atypical}/<dataset>_<uid>.png resolve
    np.testing.assert_array_equal(pixels, decode_figures(breast_subset[:4]))
    merged = merge_datasets([breast_subset, read_amibr(root)])
    assert len(merged) == len(breast_subset) + 5  # every MIDOG21 figure was already in MIDOG25
    assert sum(f.origin == "TUPAC16" for f in merged) == 5
    # a MIDOG21 slide is one group whichever table names it: no slide can straddle folds through the merge
    assert {f.slide for f in amibr if f.origin == "MIDOG21"} == {f.slide for f in breast_subset}


def test_midog21_slide_numbers_give_the_scanner_midog25_names(breast_subset):
    from training.data import _midog21_scanner

    assert all(_midog21_scanner(f.slide) == f.scanner for f in breast_subset)


def test_real_omg_octo_table_reads_with_its_repeated_rows_dropped(caplog):
    from training.data import read_dataset

    figures = read_dataset(shared_path("metadata"))  # OMG-Octo.csv lives there (images are not included)
    assert len(figures) == 1753  # 1757 rows, 4 exact repeats
    assert "dropped 4 repeated row(s)" in caplog.text
    assert {f.source for f in figures} == {"OMG-Octo"} and sum(f.label for f in figures) > 1300
    with pytest.raises(DataError, match="bad image"):
        decode_figures(figures[:3])


def test_soft_labels_come_from_expert_votes(breast_subset):
    assert all(len(f.votes) in (2, 3) for f in breast_subset)
    assert all(round(f.soft_label) == f.label for f in breast_subset)  # the majority is the label
    disputed = [f for f in breast_subset if f.soft_label not in (0.0, 1.0)]
    assert disputed and all(f.soft_label in (1 / 3, 2 / 3) for f in disputed)


def test_decoded_patches_are_cached_by_file_identity(tmp_path, breast_subset):
    figures = breast_subset[:10]
    first = decode_figures(figures, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("patches-*.npy")
    np.testing.assert_array_equal(decode_figures(figures, cache_dir=tmp_path), first)
    assert list(tmp_path.glob("patches-*.npy")) == [cache_file]
    decode_figures(breast_subset[:11], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("patches-*.npy"))) == 2  # other files, another key


def test_unknown_folder_names_the_tables_it_looked_for(tmp_path):
    from training.data import read_dataset

    with pytest.raises(DataError, match=r"AMI-BR\.csv"):
        read_dataset(tmp_path)


def test_held_out_scanners_match_any_spelling_and_a_typo_is_named(breast_subset):
    from training.data import on_scanners

    held_out = on_scanners(breast_subset, ["Hammamatsu XR"])  # the real CSV's spelling
    assert sum(held_out) == 451
    assert {f.scanner for f, out in zip(breast_subset, held_out, strict=True) if out} == {"Hamamatsu XR"}
    with pytest.raises(DataError, match=r"Aperio GT450.*the data has: Aperio CS2, Hamamatsu S360, Hamamatsu XR"):
        on_scanners(breast_subset, ["Aperio GT450"])
    spelled = TrainConfig(hold_out_scanners=["Hammamatsu XR", "Hamamatsu XR"]).hold_out_scanners
    assert spelled == ["Hamamatsu XR"]  # one spelling in the run's config, so a resumed command matches either


def test_a_scanner_without_a_known_pixel_size_is_named(tmp_path):
    write_midog25(tmp_path, n=4, seed=0, n_slides=2)
    figures = read_midog25(tmp_path)
    figures[1] = dataclasses.replace(figures[1], scanner="3D Histech")
    pixels = np.zeros((4, 128, 128, 3), np.uint8)
    with pytest.raises(DataError, match=r"3D Histech.*SCANNER_PIXEL_SIZE_UM"):
        at_pixel_size(figures, pixels, 0.23)
