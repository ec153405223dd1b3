"""Training data: class folders, pair lists, the class-disjoint split, the P x K sampler, bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import DataError
from train.data import (ClassBatches, ImageBatch, PairBatches, PairBatchSampler, PKSampler, TrainImages,
                        batch_pairs, cap_per_class, class_groups, collate_slots, load_class_folder, load_data,
                        load_pairs, similar_components, split_classes, split_pairs)


def _image(path: Path, colour=(200, 30, 30), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _tree(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            _image(root / name / f"{k}.png", (20 * c % 255, 40 * k % 255, 90))
    return root


def test_class_folder_loads_sorted_and_labelled(tmp_path):
    root = _tree(tmp_path / "set", {"b": 2, "a": 3, ".hidden": 4})
    (root / "README.txt").write_text("not a class")
    data = load_class_folder(root)
    assert data.classes == ["a", "b"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.labels.dtype == np.int64
    assert all(Path(p).exists() for p in data.paths)
    assert load_data(root).classes == ["a", "b"]


def test_bad_class_folder_lists_every_offender_in_one_error(tmp_path):
    root = _tree(tmp_path / "set", {"ok": 3, "lonely": 1, "also_ok": 2})
    (root / "empty").mkdir()
    (root / "ok" / "broken.jpg").write_text("this is not a jpeg")
    (root / "also_ok" / "zero.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_class_folder(root)
    msg = str(err.value)
    assert "\n" not in msg
    assert "2 classes with fewer than 2 images" in msg and "lonely: 1" in msg and "empty: 0" in msg
    assert "2 unreadable files" in msg and "broken.jpg" in msg and "zero.png" in msg


def test_empty_and_single_class_and_missing_folder(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="empty set"):
        load_class_folder(tmp_path / "nothing")
    with pytest.raises(DataError, match="only one class"):
        load_class_folder(_tree(tmp_path / "one", {"solo": 3}))
    with pytest.raises(DataError, match="no such folder or pair list"):
        load_data(tmp_path / "absent")


def test_cap_per_class_is_seeded(tmp_path):
    data = load_class_folder(_tree(tmp_path / "set", {"a": 6, "b": 2}))
    capped = cap_per_class(data, 3, seed=1)
    assert np.bincount(capped.labels).tolist() == [3, 2]
    assert cap_per_class(data, 3, seed=1).paths == capped.paths
    assert load_class_folder(tmp_path / "set", max_per_class=3, seed=1).paths == capped.paths


def _pairs_csv(tmp_path: Path, rows: list[str], header: bool = True) -> Path:
    for name in ("x/1.png", "x/2.png", "y/1.png", "y/2.png", "z/1.png"):
        _image(tmp_path / name)
    path = tmp_path / "pairs.csv"
    path.write_text(("img_a,img_b,label\n" if header else "") + "\n".join(rows) + "\n")
    return path


def test_pair_csv_loads_with_relative_paths(tmp_path):
    path = _pairs_csv(tmp_path, ["x/1.png,x/2.png,1", "y/1.png,y/2.png,1", "x/1.png,y/1.png,0", "z/1.png,x/2.png,0"])
    data = load_pairs(path)
    assert len(data) == 4 and len(data.images) == 5
    assert data.same.tolist() == [1, 1, 0, 0]
    assert data.images[data.a[0]] == str(tmp_path / "x" / "1.png")
    # Components of the similar pairs stand in for classes: {x1, x2}, {y1, y2}, {z1}.
    assert len(set(data.groups.tolist())) == 3
    assert data.groups[data.a[0]] == data.groups[data.b[0]] != data.groups[data.a[1]]
    assert len(load_pairs(_pairs_csv(tmp_path, ["x/1.png,x/2.png,1", "x/1.png,y/1.png,0"], header=False))) == 2


def test_bad_pair_csv_lists_every_offender(tmp_path):
    path = _pairs_csv(tmp_path, ["x/1.png,x/2.png,1", "x/1.png,y/1.png,2", "x/1.png,gone.png,0", "x/1.png,y/2.png",
                                 "y/1.png,y/2.png,yes"])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    msg = str(err.value)
    assert "2 labels other than 0/1" in msg and "line 3: '2'" in msg and "line 6: 'yes'" in msg
    assert "1 malformed rows" in msg and "line 5" in msg
    assert "1 missing files (line 4: gone.png)" in msg


def test_pair_csv_needs_pairs_of_both_kinds(tmp_path):
    with pytest.raises(DataError, match="empty set"):
        load_pairs(_pairs_csv(tmp_path, []))
    with pytest.raises(DataError, match="no dissimilar"):
        load_pairs(_pairs_csv(tmp_path, ["x/1.png,x/2.png,1"]))


def test_split_classes_is_disjoint_seeded_and_covers_everything(tmp_path):
    data = load_class_folder(_tree(tmp_path / "set", {f"c{i}": 2 for i in range(10)}), check_files=False)
    train, val = split_classes(data, 0.3, seed=4)
    assert len(val.classes) == 3 and len(train.classes) == 7
    assert not set(train.classes) & set(val.classes)
    assert sorted(train.paths + val.paths) == sorted(data.paths)
    assert split_classes(data, 0.3, seed=4)[1].classes == val.classes
    assert split_classes(data, 0.3, seed=5)[1].classes != val.classes
    assert val.labels.max() == 2 and train.labels.max() == 6  # relabelled 0..C-1
    for name, label in zip(val.paths, val.labels):
        assert Path(name).parent.name == val.classes[label]


def test_split_by_group_keeps_alphabets_whole(tmp_path):
    names = [f"{a}__character{k:02d}" for a in ("Greek", "Latin", "Korean", "Tagalog") for k in range(3)]
    data = load_class_folder(_tree(tmp_path / "omni", {n: 2 for n in names}), check_files=False)
    assert class_groups(data.classes, "__").max() == 3
    train, val = split_classes(data, 0.25, seed=0, group_sep="__")
    alphabets = lambda d: {c.split("__")[0] for c in d.classes}  # noqa: E731
    assert len(alphabets(val)) == 1 and len(alphabets(train)) == 3
    assert not alphabets(train) & alphabets(val)
    with pytest.raises(DataError, match="both need at least 2"):
        split_classes(load_class_folder(_tree(tmp_path / "three", {"a": 2, "b": 2, "c": 2})), 0.5, 0)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_classes(data, 1.5, 0)


def test_split_pairs_by_identity(tmp_path):
    # Four identities {0,1} {2,3} {4,5} {6,7}, a dissimilar pair between every two of them.
    a = np.array([0, 2, 4, 6, 0, 0, 0, 3, 3, 5])
    b = np.array([1, 3, 5, 7, 2, 4, 6, 5, 7, 7])
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert similar_components(8, a, b, same).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    from train.data import PairData

    data = PairData([f"/img{i}.png" for i in range(8)], a, b, same, "mem")
    train, val = split_pairs(data, 0.5, seed=0)
    assert not set(train.images) & set(val.images)
    assert set(train.same.tolist()) == set(val.same.tolist()) == {0, 1}
    assert len(train) == len(val) == 3  # 2 similar + 1 dissimilar each; the 4 crossing pairs are dropped


def test_pk_sampler_balanced_seeded_per_epoch():
    labels = np.repeat(np.arange(6), [5, 5, 5, 5, 5, 2])
    sampler = PKSampler(labels, classes_per_batch=3, images_per_class=4, seed=0)
    assert len(sampler) == len(labels) // 12
    batches = list(sampler)
    for batch in batches:
        assert len(batch) == 12
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 3 and counts.tolist() == [4, 4, 4]
    # A class of 2 shows both images before repeating one.
    sampler6 = PKSampler(labels, 6, 4, seed=0, batches=1)
    small = [i for i in next(iter(sampler6)) if labels[i] == 5]
    assert sorted(set(small)) == [25, 26]
    assert list(sampler) == batches  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(DataError):
        PKSampler(np.zeros(5, np.int64), 4, 2)


def test_pair_batches_keep_pairs_through_failed_images(tmp_path):
    from train.data import PairData

    good = [str(_image(tmp_path / f"{i}.png")) for i in range(4)]
    images = good + [str(tmp_path / "missing.png")]
    data = PairData(images, np.array([0, 2, 0, 4]), np.array([1, 3, 2, 1]), np.array([1, 1, 0, 0]), "mem")
    batches = PairBatches(data, PairBatchSampler(len(data), 4, seed=0, batches=1))
    items = next(iter(batches))
    dataset = TrainImages(images, lambda im: __import__("torch").zeros(3, 4, 4))
    batch = collate_slots([dataset[key] for key in items])
    assert isinstance(batch, ImageBatch) and batch.requested == 8 and len(batch.failures) == 1
    i, j, same = batch_pairs(batch)
    assert len(i) == 3  # the pair with the missing image is dropped, the others keep their partners
    got = {(items[batch.slots[x]][1], items[batch.slots[y]][1], s) for x, y, s in zip(i, j, same)}
    assert got == {(0, 1, 1), (2, 3, 1), (0, 2, 0)}


def test_class_batches_carry_labels():
    labels = np.repeat(np.arange(4), 3)
    batches = ClassBatches(labels, PKSampler(labels, 2, 3, seed=0))
    for items in batches:
        assert [slot for slot, _, _ in items] == list(range(6))
        assert all(labels[i] == tag for _, i, tag in items)
