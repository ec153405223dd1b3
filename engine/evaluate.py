"""Measure encoders on labelled images: the library function behind ``engine eval``.

A dataset is either a folder-per-class tree (every image is scored as a retrieval query and random
same/different-class pairs score verification) or a CSV of pairs ``img_a,img_b,label`` (verification
only). Several encoders can be measured side by side on exactly the same images and pairs.

CLI mapping (``engine eval DATASET [options]``)::

    evaluate_models(DATASET, models=[--model ...] or ["pretrained"],
                    config=EvalConfig(protocol=--protocol, ks=--k, batch_size=--batch-size,
                                      workers=--workers, device=--device,
                                      max_per_class=--max-per-class, n_pairs=--pairs, seed=--seed),
                    out_dir=--out, progress=...)
    print(format_table(reports))            # --json: one json.dumps(report.to_dict()) line per model
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine.errors import DataError
from engine.expansion import SHORTLIST_DEPTH, Expansion, ShortlistRescorer, expand_queries
from engine.metrics import (
    knn,
    oneshot_accuracy,
    pair_distances,
    per_class_metrics,
    per_class_metrics_split,
    precision_recall_curve,
    retrieval_metrics,
    retrieval_metrics_split,
    roc_curve,
    sample_pairs,
    verification_metrics,
)
from engine.pairs import PairList, read_pairs
from engine.report import format_table, write_outputs  # noqa: F401  (format_table: engine eval's table)

if TYPE_CHECKING:
    from engine.encoder import Encoder
    from engine.progress import ProgressFn

log = logging.getLogger(__name__)

PROTOCOLS = ("loo", "split", "oneshot")
# Always reported, so that tables from different runs line up whatever --k asked for.
STANDARD_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalConfig:
    """How an evaluation runs.

    protocol: "loo" (every image queries all the others), "split" (per class, a seeded
        ``query_fraction`` of the images query a gallery of the rest) or "oneshot" (per class one
        seeded gallery image; the rest query it: N-way one-shot). Ignored for a pair CSV.
    ks: retrieval cut-offs; 1, 5 and 10 are always added.
    batch_size, workers, device: embedding (workers None = engine.loader.default_workers()).
    max_per_class: keep at most this many images per class (a seeded choice), None = all.
    n_pairs: verification pairs drawn from the evaluated images (half similar, half dissimilar).
    seed: drives the per-class cap, the split, the pairs and the example queries.
    threshold: the L2 distance judged for accuracy/precision/recall/F1; None = the model's own
        (``Encoder.decision_threshold``: a checkpoint's calibrated one, else DEFAULT_THRESHOLD).
    examples: queries shown in retrieval_examples.png; example_k: hits shown per query.
    expand, expand_alpha: query expansion as ``engine query --expand`` does it (engine.expansion:
        alpha-QE from the gallery, then the shortlist augmented and re-ranked); 0 = none. Retrieval
        figures only: verification pairs compare two images as ``engine compare`` does.
    """

    protocol: str = "loo"
    ks: tuple[int, ...] = STANDARD_KS
    batch_size: int = 32
    workers: int | None = None
    max_per_class: int | None = None
    n_pairs: int = 5000
    seed: int = 0
    device: str = "cpu"
    query_fraction: float = 0.5
    threshold: float | None = None
    examples: int = 6
    example_k: int = 5
    expand: int = 0
    expand_alpha: float = 3.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise DataError(f"unknown protocol {self.protocol!r} (use {', '.join(PROTOCOLS)})")
        ks = tuple(sorted({int(k) for k in self.ks} | set(STANDARD_KS)))
        if ks[0] < 1:
            raise DataError(f"--k values must be positive, got {self.ks}")
        object.__setattr__(self, "ks", ks)
        if self.max_per_class is not None and self.max_per_class < 2:
            raise DataError(f"--max-per-class must be at least 2, got {self.max_per_class}")
        if not 0.0 < self.query_fraction < 1.0:
            raise DataError(f"query_fraction must lie strictly between 0 and 1, got {self.query_fraction}")
        if self.n_pairs < 2:
            raise DataError(f"--pairs must be at least 2, got {self.n_pairs}")
        Expansion(self.expand, self.expand_alpha)  # raises EngineError for a bad value

    @property
    def expansion(self) -> Expansion:
        return Expansion(self.expand, self.expand_alpha)


@dataclass(frozen=True)
class EvalReport:
    """One model measured on one dataset.

    metrics: folder datasets give "recall@K", "precision@K" (K in config.ks), "map@r", "map",
        "r_precision", "queries" and, for oneshot, "oneshot_accuracy"; both kinds give the
        verification figures "roc_auc", "eer", "eer_threshold", "threshold", "best_threshold",
        "best_accuracy", "accuracy", "precision", "recall", "f1", "pairs", "positives".
    per_class: rows worst first (see engine.metrics.per_class_metrics); empty for a pair CSV.
    images: images embedded and scored; failures: (path, reason) of files that could not be read.
    files: the figures and reports written, name -> path.
    """

    model: str
    name: str
    dataset: str
    kind: str
    protocol: str
    images: int
    classes: int
    metrics: dict[str, float]
    per_class: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    encoder: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The one JSON form of a report: what ``engine eval --json`` prints (one object per model,
        one per line) and what metrics.json lists under "reports". Every field above by name,
        ``metrics`` nested as {name: number}, failures as {"path", "reason"} objects; plain Python
        values only (numpy scalars and arrays converted), so any JSON encoder takes it as it is."""
        out = asdict(self)
        out["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        return _plain(out)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays, tuples and Paths inside dicts and lists -> plain JSON-ready values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class _ClassImages:
    root: Path
    paths: list[str]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]


def _load_classes(root: Path, max_per_class: int | None, seed: int) -> _ClassImages:
    from engine.files import cap_per_class, list_class_folder

    if not root.is_dir():
        raise DataError(f"no such dataset folder: {root}")
    paths, labels, names = list_class_folder(root)
    if not paths:
        raise DataError(f"{root} holds no images in class folders (expected {root}/<class>/<image>)")
    present = np.unique(labels)
    if present.size < 2:
        raise DataError(f"{root} has images in {present.size} class folder; evaluation needs at least two classes")
    if max_per_class is not None:
        chosen = cap_per_class(labels, max_per_class, seed)
        paths = [paths[i] for i in chosen]
        labels = labels[chosen]
    return _ClassImages(root, paths, labels, names)


# --------------------------------------------------------------------------------------------------
# one model


@dataclass
class _Figures:
    """What the plots need from one model's run (kept out of the report)."""

    pos: np.ndarray
    neg: np.ndarray
    threshold: float
    roc: tuple[np.ndarray, np.ndarray, float]
    pr: tuple[np.ndarray, np.ndarray]
    embeddings: np.ndarray | None = None
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    examples: tuple | None = None
    pairs: tuple | None = None


def _split_indices(labels: np.ndarray, protocol: str, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded query/gallery split -> (query idx int64, gallery idx int64). A class of one
    image goes to the gallery, where it can only be a distractor."""
    rng = np.random.default_rng(seed)
    queries, gallery = [], []
    for label in np.unique(labels):
        mine = rng.permutation(np.flatnonzero(labels == label))
        if mine.size == 1:
            gallery.append(mine)
            continue
        n_query = mine.size - 1 if protocol == "oneshot" else min(mine.size - 1, max(1, round(mine.size * fraction)))
        queries.append(mine[:n_query])
        gallery.append(mine[n_query:])
    if not queries:
        raise DataError("no class has two images: nothing can be queried")
    return np.sort(np.concatenate(queries)), np.sort(np.concatenate(gallery))


def _threshold_for(encoder: Encoder, config: EvalConfig) -> float:
    if config.threshold is not None:
        return float(config.threshold)
    return encoder.decision_threshold


def _verification(distances: np.ndarray, same: np.ndarray, threshold: float) -> tuple[dict, _Figures]:
    ver = verification_metrics(distances, same, threshold)
    fpr, tpr, _ = roc_curve(distances, same)
    precision, recall, _ = precision_recall_curve(distances, same)
    figures = _Figures(pos=distances[same == 1], neg=distances[same == 0], threshold=threshold,
                       roc=(fpr, tpr, ver["roc_auc"]), pr=(recall, precision))
    return ver, figures


def _examples(emb: np.ndarray, labels: np.ndarray, query_idx: np.ndarray, gallery_idx: np.ndarray | None,
              config: EvalConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded example queries that can be scored, with their top hits.

    Returns (queries int64 [E], hits int64 [E, k] (indices into emb), correct bool [E, k],
    scores float32 [E, k]). gallery_idx None means leave-one-out over all of emb.
    """
    gallery = np.arange(emb.shape[0]) if gallery_idx is None else gallery_idx
    in_gallery = np.bincount(labels[gallery], minlength=int(labels.max()) + 1)
    # Leave-one-out: the query's own image is in the gallery but does not count.
    needed = 2 if gallery_idx is None else 1
    scorable = query_idx[in_gallery[labels[query_idx]] >= needed].astype(np.int64)
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(scorable, min(config.examples, scorable.size), replace=False))
    k = min(config.example_k, gallery.size - (1 if gallery_idx is None else 0))
    if chosen.size == 0 or k < 1:
        empty = np.zeros((0, max(k, 0)))
        return chosen, empty.astype(np.int64), empty.astype(bool), empty.astype(np.float32)
    extra = 1 if gallery_idx is None else 0
    scores, ids = knn(emb[chosen], emb[gallery], k + extra)
    ids = gallery[ids]
    if extra:
        # Leave-one-out: drop the query itself, else (duplicates crowded it out) the last column.
        drop = ids == chosen[:, None]
        drop[~drop.any(axis=1), -1] = True
        ids = ids[~drop].reshape(chosen.size, k)
        scores = scores[~drop].reshape(chosen.size, k)
    return chosen, ids, labels[ids] == labels[chosen][:, None], scores


def _evaluate_classes(data: _ClassImages, model: str, config: EvalConfig,
                      progress: ProgressFn | None) -> tuple[EvalReport, _Figures]:
    from engine.embedding import embed_files
    from engine.encoder import load_encoder, resolve_device

    start = time.perf_counter()
    if progress:
        progress(0, None)  # the data is good; the slow part begins (the encoder)
    encoder = load_encoder(model, resolve_device(config.device))
    if progress:
        progress(0, len(data.paths))  # the bar knows its total before the first batch
    embedded = embed_files(encoder, data.paths, batch_size=config.batch_size, workers=config.workers,
                           progress=progress)
    log.info("embedded %d images with %s in %.1fs", len(embedded.positions), model, time.perf_counter() - start)
    if embedded.embeddings.shape[0] == 0:
        raise DataError(f"none of the {len(data.paths)} images in {data.root} could be read")
    return score_classes(embedded.embeddings, data.labels[embedded.positions],
                         [data.paths[p] for p in embedded.positions], data.class_names, config,
                         threshold=_threshold_for(encoder, config), model=str(model), name=_model_name(model),
                         dataset=str(data.root), encoder=_encoder_facts(encoder), failures=list(embedded.failures),
                         started=start)


def score_classes(emb: np.ndarray, labels: np.ndarray, paths: Sequence[str], class_names: list[str],
                  config: EvalConfig, *, threshold: float, model: str, name: str, dataset: str,
                  encoder: dict[str, Any], failures: list[tuple[str, str]] | None = None,
                  started: float | None = None) -> tuple[EvalReport, _Figures]:
    """Retrieval and verification figures of labelled embeddings: emb float32 [N, D] (unit
    vectors), labels int64 [N] indexing ``class_names``, paths [N] (for the example figure).
    The protocol, cut-offs, pairs and seed come from ``config``; ``threshold`` is the L2 distance
    judged for verification. The rest only describes the report."""
    start = time.perf_counter() if started is None else started
    expansion = config.expansion
    if config.protocol == "loo":
        queries = expand_queries(emb, emb, expansion, leave_out_self=True)
        rescore = ShortlistRescorer(queries, emb, expansion, SHORTLIST_DEPTH) if expansion.enabled else None
        metrics = retrieval_metrics(emb, labels, config.ks, query_vectors=queries, rescore=rescore)
        per_class = per_class_metrics(emb, labels, class_names, query_vectors=queries, rescore=rescore)
        query_idx, gallery_idx = np.arange(emb.shape[0]), None
    else:
        query_idx, gallery_idx = _split_indices(labels, config.protocol, config.query_fraction, config.seed)
        q, ql, g, gl = emb[query_idx], labels[query_idx], emb[gallery_idx], labels[gallery_idx]
        q = expand_queries(q, g, expansion)
        rescore = ShortlistRescorer(q, g, expansion, SHORTLIST_DEPTH) if expansion.enabled else None
        metrics = retrieval_metrics_split(q, ql, g, gl, config.ks, rescore=rescore)
        per_class = per_class_metrics_split(q, ql, g, gl, class_names, rescore=rescore)
        if config.protocol == "oneshot":
            # The best gallery item as the ranking orders it (with expansion: after re-ranking).
            metrics["oneshot_accuracy"] = (metrics["recall@1"] if expansion.enabled
                                           else oneshot_accuracy(q, ql, g, gl))
    if expansion.enabled:
        metrics["expand"] = expansion.n
        metrics["expand_alpha"] = expansion.alpha

    i, j, same = sample_pairs(labels, config.n_pairs, config.seed)
    ver, figures = _verification(pair_distances(emb[i], emb[j]), same, threshold)
    metrics.update(ver)
    figures.embeddings, figures.labels, figures.class_names = emb, labels, class_names
    chosen, hits, correct, scores = _examples(emb, labels, query_idx, gallery_idx, config)
    figures.examples = ([paths[c] for c in chosen], [[paths[h] for h in row] for row in hits],
                        correct.tolist(), scores.tolist())

    report = EvalReport(
        model=model, name=name, dataset=dataset, kind="classes",
        protocol=config.protocol, images=int(emb.shape[0]), classes=int(np.unique(labels).size),
        metrics=metrics, per_class=per_class, failures=list(failures or []),
        encoder=encoder, seconds=round(time.perf_counter() - start, 3))
    return report, figures


def _evaluate_pairs(data: PairList, model: str, config: EvalConfig,
                    progress: ProgressFn | None) -> tuple[EvalReport, _Figures]:
    from engine.embedding import embed_files
    from engine.encoder import load_encoder, resolve_device

    start = time.perf_counter()
    if progress:
        progress(0, None)
    encoder = load_encoder(model, resolve_device(config.device))
    paths_a = [data.images[i] for i in data.a]
    paths_b = [data.images[i] for i in data.b]
    unique = sorted(data.images)
    embedded = embed_files(encoder, unique, batch_size=config.batch_size, workers=config.workers, progress=progress)
    row_of = {unique[p]: n for n, p in enumerate(embedded.positions)}
    usable = np.asarray([a in row_of and b in row_of for a, b in zip(paths_a, paths_b)], dtype=bool)
    if not usable.any():
        raise DataError(f"no pair in {data.source} has two readable images")
    if not usable.all():
        log.warning("%d pairs dropped: an image could not be read", int((~usable).sum()))
    ia = np.asarray([row_of[a] for a, ok in zip(paths_a, usable) if ok], np.int64)
    ib = np.asarray([row_of[b] for b, ok in zip(paths_b, usable) if ok], np.int64)
    same = data.same[usable]
    distances = pair_distances(embedded.embeddings[ia], embedded.embeddings[ib])
    threshold = _threshold_for(encoder, config)
    metrics, figures = _verification(distances, same, threshold)
    metrics["dropped_pairs"] = int((~usable).sum())
    # Show the wrong verdicts first: they are what a reader of pairs.png wants to see.
    a_kept = [a for a, ok in zip(paths_a, usable) if ok]
    b_kept = [b for b, ok in zip(paths_b, usable) if ok]
    wrong = (distances <= threshold) != (same == 1)
    order = np.concatenate([np.flatnonzero(wrong), np.flatnonzero(~wrong)])[:16]
    figures.pairs = ([(a_kept[n], b_kept[n]) for n in order], distances[order].tolist(), same[order].tolist())
    report = EvalReport(
        model=str(model), name=_model_name(model), dataset=str(data.source), kind="pairs", protocol="pairs",
        images=int(embedded.embeddings.shape[0]), classes=0, metrics=metrics, per_class=[],
        failures=list(embedded.failures), encoder=_encoder_facts(encoder),
        seconds=round(time.perf_counter() - start, 3))
    return report, figures


def _model_progress(progress: ProgressFn | None, n: int, n_models: int) -> ProgressFn | None:
    """Model ``n``'s embedding progress as a share of one count over all ``n_models`` models."""
    if progress is None:
        return None

    def report(done: int, total: int | None) -> None:
        if total is None:
            if n == 0 or done:  # "the slow part begins" once for all the models
                progress(done, None)
        else:
            progress(n * total + done, n_models * total)

    return report


def _model_name(model: str) -> str:
    return "pretrained" if model == "pretrained" else Path(model).name


def _encoder_facts(encoder) -> dict[str, Any]:
    facts = dict(encoder.describe())
    facts["identity"] = encoder.identity()
    facts["threshold"] = encoder.threshold
    facts["weights"] = encoder.metadata.get("checkpoint") or encoder.metadata.get("weights_source")
    return facts


# --------------------------------------------------------------------------------------------------
# public entry points


def evaluate(dataset: str | Path, model: str = "pretrained", config: EvalConfig = EvalConfig(),
             out_dir: str | Path | None = None, progress: ProgressFn | None = None) -> EvalReport:
    """Evaluate one encoder on ``dataset``; see ``evaluate_models`` (this is it with one model)."""
    return evaluate_models(dataset, [model], config, out_dir, progress)[0]


def evaluate_models(dataset: str | Path, models: Sequence[str], config: EvalConfig = EvalConfig(),
                    out_dir: str | Path | None = None,
                    progress: ProgressFn | None = None) -> list[EvalReport]:
    """Evaluate each encoder on the same images and pairs.

    dataset: a folder-per-class tree or a pair CSV (``img_a,img_b,label``, read by engine.pairs.read_pairs).
    models: "pretrained" or checkpoint paths (engine.encoder.load_encoder), in table order.
    progress(done, total): files embedded so far out of all the models' files together (each
        model embeds the same files), after each batch.
    out_dir: when given, writes metrics.json ({"reports": [EvalReport.to_dict(), ...]}), report.md,
        roc.png and pr_curve.png (one curve per model), and per model distances.png,
        retrieval_examples.png and embedding_2d.png (folder datasets) or pairs.png (pair CSVs);
        with several models those per-model names get a ``_<model>`` suffix.

    Raises DataError for unusable data, ModelError for an unusable model.
    """
    if not models:
        raise DataError("no model to evaluate")
    source = Path(dataset)
    if not source.exists():
        raise DataError(f"no such dataset: {source} (expected a folder-per-class tree or a pair CSV)")
    if source.is_file():
        data: Any = read_pairs(source)
        runner = _evaluate_pairs
    else:
        data = _load_classes(source, config.max_per_class, config.seed)
        runner = _evaluate_classes
    results = [runner(data, str(model), config, _model_progress(progress, n, len(models)))
               for n, model in enumerate(models)]
    if out_dir is None:
        return [report for report, _ in results]
    return write_outputs(results, config, Path(out_dir))
