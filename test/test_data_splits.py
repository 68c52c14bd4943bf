"""The MIDOG25 reader and the slide-grouped folds, on the real breast subset and the official CSV's schema."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
from conftest import shared_path

from training.data import MIDOG25_COLUMNS, MIDOG25_CSV, DataError, decode_figures, normalize_scanner, read_midog25
from training.splits import SPLITS_FILE, load_or_create_splits, slide_grouped_folds
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
    folds = load_or_create_splits(tmp_path, breast_subset, n_folds=3, seed=1)
    saved = json.loads((tmp_path / SPLITS_FILE).read_text())
    assert saved["val_ids"] == folds and saved["seed"] == 1
    assert load_or_create_splits(tmp_path, breast_subset, n_folds=3, seed=999) == folds  # reused, not redrawn
    with pytest.raises(ValueError, match="other data"):
        load_or_create_splits(tmp_path, breast_subset[:100], n_folds=3, seed=1)


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
    with pytest.raises(DataError, match=r"duplicate image_id: 1\.png"):
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
