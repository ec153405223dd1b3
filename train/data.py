"""Training data: a folder-per-class tree or a pair list CSV, the class-disjoint validation split, the
P x K batch sampler and the image dataset that decodes through ``engine.preprocess``.

Two shapes of data:
- ``ClassData``: paths and int64 labels from ``<root>/<class>/<image>`` (``engine.files.list_class_folder``).
  Batches are P classes x K images; pairs or triplets are mined inside the batch.
- ``PairData``: the classic Siamese list ``img_a,img_b,label``, read by ``engine.pairs`` (whose docstring
  states the rules). Images are numbered once; the pairs index into them.

Everything that is wrong with a data set is reported in one ``DataError`` that names the offenders.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from engine.errors import DataError, ImageError
from engine.preprocess import IMAGE_SUFFIXES, open_image

log = logging.getLogger(__name__)

_SHOW = 5  # offenders named per kind in an error message


# --------------------------------------------------------------------------------------------- data sets


@dataclass
class ClassData:
    """A labelled image set. paths: N files; labels: int64 [N] indexing ``classes``; source: where from."""

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(np.unique(self.labels))

    def subset(self, class_ids: Sequence[int], source: str | None = None) -> "ClassData":
        """Only the images of ``class_ids`` (indices into ``classes``), relabelled 0..C-1 in the given
        order, class names kept."""
        class_ids = [int(c) for c in class_ids]
        remap = {c: i for i, c in enumerate(class_ids)}
        keep = np.flatnonzero(np.isin(self.labels, class_ids))
        labels = np.asarray([remap[int(self.labels[i])] for i in keep], np.int64)
        return ClassData([self.paths[i] for i in keep], labels, [self.classes[c] for c in class_ids],
                         source if source is not None else self.source)


@dataclass
class PairData:
    """A pair list. images: M unique files; a, b: int64 [P] indices into ``images``; same: int64 [P] of
    0/1; groups: int64 [M], the connected components of the similar pairs (a stand-in for classes)."""

    images: list[str]
    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    source: str = ""
    groups: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = similar_components(len(self.images), self.a, self.b, self.same)

    def __len__(self) -> int:
        return len(self.a)

    def subset_pairs(self, keep: np.ndarray, source: str | None = None) -> "PairData":
        """Only the pairs where ``keep`` (bool [P]) holds; images renumbered, unused ones dropped."""
        a, b, same = self.a[keep], self.b[keep], self.same[keep]
        used = np.unique(np.concatenate([a, b])) if len(a) else np.zeros(0, np.int64)
        remap = np.full(len(self.images), -1, np.int64)
        remap[used] = np.arange(len(used))
        return PairData([self.images[i] for i in used], remap[a], remap[b], same.astype(np.int64),
                        source if source is not None else self.source)


Data = ClassData | PairData


def similar_components(n: int, a: np.ndarray, b: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Union-find over the similar pairs: int64 [n] component id per image (ids 0..C-1, by first image)."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i, j, s in zip(a.tolist(), b.tolist(), same.tolist()):
        if s:
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    roots = np.asarray([find(i) for i in range(n)], np.int64)
    _, ids = np.unique(roots, return_inverse=True)
    return ids.astype(np.int64)


# --------------------------------------------------------------------------------------------- errors


class _Offences:
    """Collects what is wrong with a data set and raises it as one DataError."""

    def __init__(self, what: str):
        self.what = what
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, item: str) -> None:
        self.kinds.setdefault(kind, []).append(item)

    def raise_if_any(self) -> None:
        if not self.kinds:
            return
        parts = []
        for kind, items in self.kinds.items():
            shown = ", ".join(items[:_SHOW])
            more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
            parts.append(f"{len(items)} {kind} ({shown}{more})" if items[0] else kind)
        raise DataError(f"bad {self.what}: " + "; ".join(parts))


def _short(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _check_file(path: str) -> str | None:
    """None when ``path`` opens as an image (header only: cheap); otherwise the reason."""
    if not os.path.exists(path):
        return "missing"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - touching the header is the check
    except UnidentifiedImageError:
        return "not an image"
    except PermissionError:
        return "permission denied"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"unreadable: {exc}"
    return None


def _check_files(paths: Sequence[str], root: Path, offences: _Offences, workers: int = 8) -> None:
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(_check_file, unique))
    for path, reason in zip(unique, reasons):
        if reason == "missing":
            offences.add("missing files", _short(path, root))
        elif reason is not None:
            offences.add("unreadable files", f"{_short(path, root)}: {reason}")


# --------------------------------------------------------------------------------------------- loading


def load_class_folder(root: str | os.PathLike, *, max_per_class: int | None = None, seed: int = 0,
                      check_files: bool = True, what: str = "training data") -> ClassData:
    """A folder-per-class tree -> ClassData. max_per_class caps each class at a seeded random choice
    of that many images. Raises DataError naming every empty class, class with fewer than 2 images,
    unreadable file; and for an empty set or a single class."""
    from engine.files import list_class_folder

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no such folder: {root}")
    paths, labels, classes = list_class_folder(root, IMAGE_SUFFIXES)
    offences = _Offences(f"{what} in {root}")
    counts = np.bincount(labels, minlength=len(classes)) if len(classes) else np.zeros(0, np.int64)
    for name, count in zip(classes, counts):
        if count < 2:
            offences.add("classes with fewer than 2 images", f"{name}: {count}")
    if not paths:
        offences.add(f"empty set: no images in class folders under {root}", "")
    elif len(classes) < 2:
        offences.add(f"only one class ({classes[0]}): at least 2 are needed", "")
    if check_files and paths:
        _check_files(paths, root, offences)
    offences.raise_if_any()
    data = ClassData(paths, labels, classes, str(root))
    if max_per_class:
        data = cap_per_class(data, max_per_class, seed)
    return data


def cap_per_class(data: ClassData, max_per_class: int, seed: int = 0) -> ClassData:
    """At most ``max_per_class`` images per class, a seeded random choice kept in file order."""
    from engine import files

    keep = files.cap_per_class(data.labels, max_per_class, seed).tolist()
    return ClassData([data.paths[i] for i in keep], data.labels[keep], list(data.classes), data.source)


def load_pairs(path: str | os.PathLike, *, check_files: bool = True, what: str = "training data") -> PairData:
    """A pair list CSV -> PairData, read by ``engine.pairs.read_pairs`` (the rules ``engine eval`` uses
    too: same files accepted, same messages). Training then also refuses images that do not decode
    (``check_files``), as it does for class folders. Raises DataError."""
    from engine.pairs import read_pairs

    pairs = read_pairs(path)
    if check_files:
        offences = _Offences(f"{what} {pairs.source}")
        _check_files(pairs.images, pairs.source.parent, offences)
        offences.raise_if_any()
    return PairData(list(pairs.images), pairs.a, pairs.b, pairs.same, str(pairs.source))


def load_data(source: str | os.PathLike, *, max_per_class: int | None = None, seed: int = 0,
              check_files: bool = True, what: str = "training data") -> Data:
    """A folder (folder-per-class tree) or a ``.csv`` pair list."""
    source = Path(source)
    if source.is_dir():
        return load_class_folder(source, max_per_class=max_per_class, seed=seed, check_files=check_files,
                                 what=what)
    if source.suffix.lower() == ".csv" or source.is_file():
        return load_pairs(source, check_files=check_files, what=what)
    raise DataError(f"no such folder or pair list: {source}")


# --------------------------------------------------------------------------------------------- splits


def class_groups(classes: Sequence[str], group_sep: str | None = None) -> np.ndarray:
    """int64 [C]: the group of each class. With ``group_sep`` classes whose names share the part
    before it form one group (omniglot ``Alphabet__character01`` -> ``Alphabet`` with ``"__"``);
    nested class folders (``Alphabet/character01``) group the same way with ``"/"``. Without it each
    class is its own group."""
    if not group_sep:
        return np.arange(len(classes), dtype=np.int64)
    keys = [name.split(group_sep, 1)[0] if group_sep in name else name for name in classes]
    _, ids = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    return ids.astype(np.int64)


def _split_groups(n_groups: int, fraction: float, seed: int) -> np.ndarray:
    """bool [n_groups]: True for the seeded share held out for validation (at least 1, never all)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--val-classes must be between 0 and 1, not {fraction}")
    n_val = int(round(fraction * n_groups))
    n_val = min(max(n_val, 1), n_groups - 1)
    order = np.random.default_rng(seed).permutation(n_groups)
    held = np.zeros(n_groups, bool)
    held[order[:n_val]] = True
    return held


def split_classes(data: ClassData, fraction: float, seed: int = 0,
                  group_sep: str | None = None) -> tuple[ClassData, ClassData]:
    """Split by class (or class group), seeded: (train, validation) share no class. Raises DataError
    when either side would have fewer than 2 classes."""
    groups = class_groups(data.classes, group_sep)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups < 2:
        raise DataError(f"cannot hold out classes for validation: {data.source} has {n_groups} "
                        f"{'class group' if group_sep else 'class'}(es); use --val DATA")
    held = _split_groups(n_groups, fraction, seed)
    val_ids = [c for c in range(len(data.classes)) if held[groups[c]]]
    train_ids = [c for c in range(len(data.classes)) if not held[groups[c]]]
    if len(val_ids) < 2 or len(train_ids) < 2:
        raise DataError(f"a class split of {fraction} leaves {len(train_ids)} training and {len(val_ids)} "
                        "validation classes; both need at least 2")
    return data.subset(train_ids), data.subset(val_ids)


def split_pairs(data: PairData, fraction: float, seed: int = 0) -> tuple[PairData, PairData]:
    """Split a pair list by identity: the connected components of its similar pairs are held out whole,
    so no image (and no similar pair) is on both sides. Pairs that cross the split are dropped."""
    groups = data.groups
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups < 2:
        raise DataError(f"cannot hold out images of {data.source}: its similar pairs connect every image; "
                        "use --val DATA")
    held = _split_groups(n_groups, fraction, seed)
    side = held[groups]  # True = validation, per image
    in_val = side[data.a] & side[data.b]
    in_train = ~side[data.a] & ~side[data.b]
    train, val = data.subset_pairs(in_train), data.subset_pairs(in_val)
    for part, name in ((train, "training"), (val, "validation")):
        if len(part) == 0 or part.same.min() == part.same.max():
            raise DataError(f"splitting {data.source} by identity leaves the {name} side without both similar "
                            "and dissimilar pairs; pass a separate --val pair list")
    dropped = len(data) - len(train) - len(val)
    if dropped:
        log.info("%d dissimilar pairs cross the class split and were left out", dropped)
    return train, val


# --------------------------------------------------------------------------------------------- sampling


class PKSampler(Sampler[list[int]]):
    """Class-balanced batches: P classes x K images, seeded per epoch (``set_epoch``), so a resumed run
    draws the same batches. A class with fewer than K images repeats some (each appears before any
    repeats). An epoch has ``len(labels) // (P*K)`` batches (at least one)."""

    def __init__(self, labels: np.ndarray, classes_per_batch: int, images_per_class: int, seed: int = 0,
                 batches: int | None = None):
        self.labels = np.asarray(labels, np.int64)
        self.by_class = [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        self.P = min(int(classes_per_batch), len(self.by_class))
        self.K = int(images_per_class)
        if self.P < 2 or self.K < 1:
            raise DataError(f"a batch needs at least 2 classes and 1 image per class (have {len(self.by_class)} "
                            f"classes, P={classes_per_batch}, K={images_per_class})")
        self.seed = int(seed)
        self.epoch = 0
        self.batches = batches or max(1, len(self.labels) // (self.P * self.K))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        # Cycle through the classes in random order so every class is seen about equally often.
        order: list[int] = []
        for _ in range(self.batches):
            if len(order) < self.P:
                order.extend(rng.permutation(len(self.by_class)).tolist())
            chosen, order = order[: self.P], order[self.P:]
            if len(set(chosen)) < self.P:  # a wrap-around repeated a class: draw distinct ones instead
                chosen = rng.choice(len(self.by_class), self.P, replace=False).tolist()
            batch: list[int] = []
            for c in chosen:
                members = self.by_class[c]
                if len(members) >= self.K:
                    pick = rng.choice(members, self.K, replace=False)
                else:
                    pick = np.concatenate([rng.permutation(members),
                                           rng.choice(members, self.K - len(members), replace=True)])
                batch.extend(int(i) for i in pick)
            yield batch


class PairBatchSampler(Sampler[list[int]]):
    """Batches of ``pairs_per_batch`` pairs, shuffled per epoch (seeded). Yields pair indices; the
    batch's images are then ``[a_0..a_n-1, b_0..b_n-1]``."""

    def __init__(self, n_pairs: int, pairs_per_batch: int, seed: int = 0, batches: int | None = None):
        self.n_pairs = int(n_pairs)
        self.per = max(1, min(int(pairs_per_batch), self.n_pairs))
        self.seed = int(seed)
        self.epoch = 0
        self.batches = batches or max(1, self.n_pairs // self.per)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order: list[int] = []
        for _ in range(self.batches):
            if len(order) < self.per:
                order.extend(rng.permutation(self.n_pairs).tolist())
            batch, order = order[: self.per], order[self.per:]
            yield batch


# --------------------------------------------------------------------------------------------- decoding


class TrainImages(Dataset):
    """``(slot, image index, tag)`` -> ``(slot, float32 [3, H, W] or None, tag, error or None)``.

    Decoding goes through ``engine.preprocess.open_image`` and the transform from
    ``build_transform(data_config, train=True)``; a file that fails is reported, not raised, so one
    truncated file does not stop a run. ``slot`` (the position in the requested batch) and ``tag`` (a
    class label, or a pair's 0/1) pass through so they survive dropped files.
    """

    def __init__(self, paths: Sequence[str], transform: Callable, draft_size: int | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int, int]):
        slot, index, tag = key
        path = self.paths[index]
        try:
            image, _ = open_image(path, draft_size=self.draft_size)
            return slot, self.transform(image), tag, None
        except ImageError as exc:
            return slot, None, tag, f"{path}: {exc}"
        except Exception as exc:  # a codec or transform bug must not stop the run
            return slot, None, tag, f"{path}: {type(exc).__name__}: {exc}"


@dataclass
class ImageBatch:
    """images: float32 [B, 3, H, W] (None when nothing decoded); slots: int64 [B], each image's position
    in the requested batch; tags: int64 [B]; requested: how many images were asked for; failures:
    'path: reason' for the images that did not decode."""

    images: torch.Tensor | None
    slots: np.ndarray
    tags: np.ndarray
    requested: int
    failures: list[str]


def collate_slots(items: list) -> ImageBatch:
    good = [(slot, t, tag) for slot, t, tag, _ in items if t is not None]
    failures = [err for _, t, _, err in items if t is None]
    images = torch.stack([t for _, t, _ in good]) if good else None
    return ImageBatch(images, np.asarray([s for s, _, _ in good], np.int64),
                      np.asarray([g for _, _, g in good], np.int64), len(items), failures)


class ClassBatches(Sampler[list[tuple[int, int, int]]]):
    """P x K batches of a ClassData as ``[(slot, image, label), ...]``."""

    def __init__(self, labels: np.ndarray, sampler: PKSampler):
        self.labels = np.asarray(labels, np.int64)
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            yield [(slot, i, int(self.labels[i])) for slot, i in enumerate(batch)]


class PairBatches(Sampler[list[tuple[int, int, int]]]):
    """Pair batches of a PairData as ``[(slot, image, same), ...]``: slots ``0..n-1`` hold the first
    images of the n pairs and ``n..2n-1`` the second ones."""

    def __init__(self, data: PairData, sampler: PairBatchSampler):
        self.data = data
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            n = len(batch)
            images = [int(self.data.a[p]) for p in batch] + [int(self.data.b[p]) for p in batch]
            same = [int(self.data.same[p]) for p in batch] * 2
            yield [(slot, images[slot], same[slot]) for slot in range(2 * n)]


def batch_pairs(batch: ImageBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a pair batch: (i, j, same) as positions into ``batch.images`` for the pairs whose two images
    both decoded."""
    n = batch.requested // 2
    where = {int(s): k for k, s in enumerate(batch.slots)}
    i, j, same = [], [], []
    for p in range(n):
        if p in where and p + n in where:
            i.append(where[p])
            j.append(where[p + n])
            same.append(int(batch.tags[where[p]]))
    return np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(same, np.int64)
