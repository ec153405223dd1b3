"""``engine eval --library``: measure the library you have, from its stored vectors.

Nothing is decoded: the vectors are the ones ingest stored, the labels are the names of the
folders the indexed files sit in (``~/Photos/beach/a.jpg`` is of class ``beach``; two folders
of one name are one class). Byte-identical copies are one image (one vector). Then the same
figures as ``engine eval`` on a folder tree (engine.evaluate.score_classes): Recall@K,
precision@K, MAP@R, per-class table, verification at the library encoder's threshold.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import DataError, IndexMissingError
from engine.evaluate import EvalConfig, EvalReport, score_classes
from engine.files import cap_per_class
from engine.report import write_outputs

if TYPE_CHECKING:
    from engine.library import Library
    from engine.progress import ProgressFn


def library_vectors(library: Library, progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids int64 [N], vectors float32 [N, D], paths [N]) of every stored vector, in id order.
    progress(done, total) counts vectors read."""
    info = library.model_info()
    total = library.store.count_embeddings()
    if progress:
        progress(0, total)
    ids_parts, vec_parts = [], []
    done = 0
    for ids, vectors in library.store.iter_embeddings(info.dim):
        ids_parts.append(ids)
        vec_parts.append(vectors)
        done += len(ids)
        if progress:
            progress(done, total)
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    vectors = np.concatenate(vec_parts) if vec_parts else np.zeros((0, info.dim), np.float32)
    records = library.store.get_images(ids.tolist())
    keep = np.asarray([int(i) in records for i in ids], bool)  # rows removed while we read
    ids, vectors = ids[keep], vectors[keep]
    return ids, vectors, [records[int(i)].path for i in ids]


def folder_labels(paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """Labels int64 [N] and class names (sorted): the name of each file's parent folder."""
    names = [os.path.basename(os.path.dirname(p)) or os.sep for p in paths]
    classes = sorted(set(names))
    index = {name: n for n, name in enumerate(classes)}
    return np.asarray([index[n] for n in names], np.int64), classes


def evaluate_library(library: Library, config: EvalConfig = EvalConfig(), out_dir: str | Path | None = None,
                     progress: ProgressFn | None = None) -> EvalReport:
    """Evaluate the library's own encoder on its stored vectors, labelled by parent folder name.

    config: as for ``engine.evaluate.evaluate_models`` (protocol, ks, max_per_class, n_pairs, seed,
    threshold; batch_size, workers and device are not used: nothing is embedded). out_dir: the same
    report folder. Raises IndexMissingError for an empty library, DataError when the files do not
    sit in at least two folders."""
    started = time.perf_counter()
    if not library.exists():
        raise IndexMissingError(f"no library in {library.paths.home} yet; run `engine ingest PATH` first")
    ids, vectors, paths = library_vectors(library, progress)
    labels, classes = folder_labels(paths)
    if len(classes) < 2:
        raise DataError(f"the library's {len(paths)} images sit in {len(classes)} folder; --library labels images "
                        "by their folder's name, so it needs at least two folders")
    if config.max_per_class is not None:
        chosen = cap_per_class(labels, config.max_per_class, config.seed)
        vectors, labels, paths = vectors[chosen], labels[chosen], [paths[i] for i in chosen]
    if np.bincount(labels).max() < 2:
        raise DataError("no folder holds two indexed images: nothing can be queried")
    info = library.model_info()
    threshold = config.threshold if config.threshold is not None else library.encoder().decision_threshold
    report, figures = score_classes(
        vectors, labels, paths, classes, config, threshold=float(threshold), model=info.spec,
        name="library", dataset=f"library {library.paths.home}",
        encoder=dict(info.to_dict(), threshold=float(threshold)), started=started)
    if out_dir is None:
        return report
    return write_outputs([(report, figures)], config, Path(out_dir))[0]
