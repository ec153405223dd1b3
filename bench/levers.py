"""Retrieval-quality levers measured on cached backbone features: pooling (average vs GeM),
whitening (PCA / learned, fitted on other images or on the evaluated ones) and query expansion
(alpha-QE, DBA), on classes the levers never saw.

The pretrained backbone's last feature maps (float16 [N, F, h, w]) are computed once per data set
and cached; every pooling, whitening and expansion is then a few seconds of numpy, so a grid costs
one pass of the backbone. The figures are the ones ``engine eval`` reports (engine.metrics, the
leave-one-out protocol), on these protocols (the README's fine-tuning table uses the same splits):

- caltech101-dev: the 10 classes the seeded 0.2 class split holds out (all their images); "other
  images" are the 40 other classes, at most 40 images each.
- caltech101-dev all: the 50 classes at most 40 images each (the README's quality table).
- orl-faces: the 10 people the seeded 0.25 split holds out; other images: the other 30.
- omniglot-background: the alphabets the seeded 0.25 group split holds out; also 20-way one-shot
  accuracy over 500 seeded episodes (one support and one query drawer per character).

Beside the levers on lite0's maps: the other pretrained backbones embedded from the files
(``backbone_rows``), a frozen-backbone checkpoint's head on the cached maps (``head_rows``), each
``--model`` name's speed (``encoder_speed``) and the cost of expansion per query in a library
(``expansion_latency``). docs/quality.md has the figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from engine.expansion import (NO_EXPANSION, SHORTLIST_DEPTH, Expansion, ShortlistRescorer, augment_database,
                              expand_queries)
from engine.metrics import oneshot_accuracy, retrieval_metrics, retrieval_metrics_split
from engine.whitening import fit_learned_whitening, fit_pca_whitening

DATASETS = Path("/work/shared/datasets")
SETS = ("caltech", "orl", "omniglot")
_FOLDERS = {"caltech": "caltech101-dev", "orl": "orl-faces", "omniglot": "omniglot-background"}
# class split of each set: (share held out, group separator)
_SPLITS = {"caltech": (0.2, None), "orl": (0.25, None), "omniglot": (0.25, "__")}


@dataclass(frozen=True)
class CachedSet:
    """One data set's cached feature maps. maps: float16 [N, F, h, w] (memory-mapped); labels int64
    [N] indexing classes; held: bool [N], the held-out classes; other: bool [N], the images a
    whitening may be fitted on without seeing the held-out classes; capped: bool [N], at most 40
    images per class (seeded)."""

    name: str
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    maps: np.ndarray
    held: np.ndarray
    other: np.ndarray
    capped: np.ndarray


def _members(name: str) -> tuple[list[str], np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(paths, labels, classes, held, other, capped: bool each) of the images to cache for ``name``."""
    from engine.files import cap_per_class, list_class_folder
    from train.data import ClassData, split_classes

    paths, labels, classes = list_class_folder(DATASETS / _FOLDERS[name])
    share, sep = _SPLITS[name]
    _, val = split_classes(ClassData(paths, labels, classes), share, 0, sep)
    held_names = set(val.classes)
    held = np.asarray([classes[c] in held_names for c in labels])
    capped = np.zeros(len(paths), bool)
    capped[cap_per_class(labels, 40, 0)] = True
    keep = held | capped if name == "caltech" else np.ones(len(paths), bool)
    other = ~held & capped if name == "caltech" else ~held
    idx = np.flatnonzero(keep)
    return [paths[i] for i in idx], labels[idx], classes, held[idx], other[idx], capped[idx]


def cache_feature_maps(name: str, cache: Path, *, backbone: str = "tf_efficientnet_lite0", batch_size: int = 32,
                       workers: int = 1, log: Callable[[str], None] = print) -> CachedSet:
    """The cached feature maps of data set ``name`` (computed on first use, into ``cache``)."""
    cache = Path(cache)
    tag = backbone.replace("tf_efficientnet_", "")
    maps_file, meta_file = cache / f"{name}_{tag}_maps.npy", cache / f"{name}_{tag}_meta.json"
    paths, labels, classes, held, other, capped = _members(name)
    if not maps_file.exists():
        cache.mkdir(parents=True, exist_ok=True)
        _compute_maps(paths, maps_file, backbone, batch_size, workers, log)
        meta_file.write_text(json.dumps({"paths": paths}))
    if json.loads(meta_file.read_text())["paths"] != paths:
        raise SystemExit(f"{maps_file} was made for other images: delete it")
    return CachedSet(name, paths, labels, classes, np.load(maps_file, mmap_mode="r"), held, other, capped)


def _compute_maps(paths: Sequence[str], target: Path, backbone: str, batch_size: int, workers: int,
                  log: Callable[[str], None]) -> None:
    import torch

    from engine.config import EncoderConfig
    from engine.encoder import build_encoder
    from engine.folding import fold_batchnorm
    from engine.loader import ImageFileDataset, decode_batches
    from engine.preprocess import build_transform, draft_size_for

    encoder = build_encoder(EncoderConfig(backbone=backbone))
    model = encoder.backbone.eval()
    dataset = ImageFileDataset(paths, build_transform(encoder.data_config), draft_size_for(encoder.data_config))
    out: np.ndarray | None = None
    folded, start, done = None, time.perf_counter(), 0
    with torch.inference_mode():
        for batch in decode_batches(dataset, batch_size, workers):
            if batch.failures:
                raise SystemExit(f"cannot read {batch.failures[0].path}: {batch.failures[0].error}")
            x = batch.images.contiguous(memory_format=torch.channels_last)
            folded = folded or fold_batchnorm(model, x[:1])
            maps = folded.forward_features(x).float().numpy()
            if out is None:
                out = np.lib.format.open_memmap(target.with_suffix(".tmp.npy"), "w+", np.float16,
                                                (len(paths), *maps.shape[1:]))
            out[[it.position for it in batch.items]] = maps.astype(np.float16)
            done += len(batch.items)
            log(f"{target.name}: {done}/{len(paths)} ({done / (time.perf_counter() - start):.1f} images/s)")
    assert out is not None
    out.flush()
    del out
    target.with_suffix(".tmp.npy").rename(target)


# --------------------------------------------------------------------------------------------- levers


def pooled(maps: np.ndarray, p: float = 1.0, block: int = 256) -> np.ndarray:
    """Generalised-mean pooling of feature maps float16 [N, F, h, w] -> float32 [N, F]
    (p = 1: average pooling), as engine.encoder's GeM layer computes it."""
    out = np.empty(maps.shape[:2], np.float32)
    for start in range(0, len(maps), block):
        x = np.maximum(np.asarray(maps[start:start + block], np.float32), 1e-6)
        out[start:start + block] = (x ** p).mean(axis=(2, 3)) ** (1.0 / p) if p != 1 else x.mean(axis=(2, 3))
    return out


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def draw_episodes(labels: np.ndarray, classes: Sequence[str], n_way: int = 20, episodes: int = 500, seed: int = 0,
                  sep: str = "__") -> tuple[list[tuple[list[int], list[int]]], list[str]]:
    """Seeded N-way one-shot episodes: N characters of one alphabet (an alphabet is the part of a
    class name before ``sep``; all classes together when no alphabet has N), one support and one
    query image each, the alphabets taken in turn. labels int [M] index ``classes``. Returns
    ([(support positions, query positions)] per episode, the alphabets drawn from)."""
    rng = np.random.default_rng(seed)
    alphabet = np.asarray([classes[c].split(sep)[0] for c in labels])
    pools = {a: np.unique(labels[alphabet == a]) for a in np.unique(alphabet)}
    pools = {a: c for a, c in pools.items() if len(c) >= n_way} or {"all": np.unique(labels)}
    names = sorted(pools)
    drawn = []
    for e in range(episodes):
        chars = rng.choice(pools[names[e % len(names)]], n_way, replace=False)
        support, query = [], []
        for c in chars:
            s, q = rng.choice(np.flatnonzero(labels == c), 2, replace=False)
            support.append(int(s))
            query.append(int(q))
        drawn.append((support, query))
    return drawn, names


def oneshot_episodes(emb: np.ndarray, labels: np.ndarray, classes: Sequence[str], expansion: Expansion = NO_EXPANSION,
                     n_way: int = 20, episodes: int = 500, seed: int = 0, sep: str = "__") -> float:
    """Mean N-way one-shot accuracy over ``draw_episodes`` (benchmarks/train_bench.py scores the
    same episodes); with expansion the query is expanded from the episode's supports and the
    supports re-ranked, as engine eval --expand does."""
    accs = []
    for support, query in draw_episodes(labels, classes, n_way, episodes, seed, sep)[0]:
        if expansion.enabled:  # as engine eval --protocol oneshot --expand: the re-ranked top hit
            q_emb = expand_queries(emb[query], emb[support], expansion)
            rescore = ShortlistRescorer(q_emb, emb[support], expansion, SHORTLIST_DEPTH)
            accs.append(retrieval_metrics_split(q_emb, labels[query], emb[support], labels[support], (1,),
                                                rescore=rescore)["recall@1"])
        else:
            accs.append(oneshot_accuracy(emb[query], labels[query], emb[support], labels[support]))
    return float(np.mean(accs))


def score(emb: np.ndarray, labels: np.ndarray, expansion: Expansion = NO_EXPANSION, *, dba: str = "none",
          depth: int = 100, classes: Sequence[str] | None = None) -> dict[str, float]:
    """Leave-one-out R@1, P@10, MAP@R of unit embeddings float32 [N, D] with int64 labels [N], the
    queries expanded; dba: "none", "shortlist" (each query's top ``depth`` augmented among
    themselves and re-ranked: what engine eval/query --expand do) or "full" (the whole gallery
    augmented; the query's own vector then enters its neighbours'). With ``classes`` (omniglot)
    also 20-way one-shot accuracy."""
    gallery = augment_database(emb, expansion) if dba == "full" else emb
    queries = expand_queries(emb, gallery, expansion, leave_out_self=True)
    rescore = ShortlistRescorer(queries, emb, expansion, depth) if dba == "shortlist" else None
    m = retrieval_metrics(gallery, labels, (1, 10), query_vectors=queries, rescore=rescore)
    out = {"R@1": m["recall@1"], "P@10": m["precision@10"], "MAP@R": m["map@r"]}
    if classes is not None:
        out["1-shot"] = oneshot_episodes(emb, labels, classes, expansion)
    return out


def expansion_grid(emb: np.ndarray, labels: np.ndarray, ns: Sequence[int], alphas: Sequence[float], *,
                   dba: Sequence[str] = ("none", "shortlist"), depth: int = 100,
                   classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``score`` without expansion and at every (dba, n, alpha): rows {"n", "alpha", "dba", figures...}."""
    rows = [dict(n=0, alpha=0.0, dba="none", **score(emb, labels, classes=classes))]
    for mode in dba:
        for n in ns:
            for alpha in alphas:
                rows.append(dict(n=n, alpha=alpha, dba=mode, **score(emb, labels, Expansion(n, alpha), dba=mode,
                                                                     depth=depth, classes=classes)))
    return rows


def subsets(cached: CachedSet) -> dict[str, np.ndarray]:
    """The evaluated subsets of a cached set, bool [N] each: "held" (the held-out classes), and for
    caltech "all40" (all 50 classes, at most 40 images each), for orl "all" (the 40 people)."""
    out = {"held": cached.held}
    if cached.name == "caltech":
        out["all40"] = cached.capped
    if cached.name == "orl":
        out["all"] = np.ones(len(cached.paths), bool)
    return out


def embeddings(cached: CachedSet, p: float = 1.0) -> np.ndarray:
    """Unit embeddings float32 [N, F] of the cached maps, GeM-pooled with exponent p (1: average:
    the encoder as shipped), kept beside the maps once computed."""
    path = Path(cached.maps.filename).with_name(f"{cached.name}_p{p:g}_emb.npy")
    if path.exists():
        return np.load(path)
    emb = normalise(pooled(cached.maps, p))
    np.save(path, emb)
    return emb


def expansion_rows(cached: CachedSet, ns: Sequence[int], alphas: Sequence[float], modes: Sequence[str],
                   only: Sequence[str] = ()) -> list[dict[str, Any]]:
    """``expansion_grid`` on each evaluated subset (or those named in ``only``)."""
    emb = embeddings(cached)
    rows = []
    for sub, mask in subsets(cached).items():
        if only and sub not in only:
            continue
        classes = cached.classes if cached.name == "omniglot" else None
        for row in expansion_grid(emb[mask], cached.labels[mask], ns, alphas, dba=modes, classes=classes):
            rows.append(dict(set=cached.name, subset=sub, **row))
    return rows


def gem_rows(cached: CachedSet, ps: Sequence[float], expansions: Sequence[Expansion]) -> list[dict[str, Any]]:
    """``score`` of GeM-pooled embeddings at each p (1 = average pooling), with each expansion."""
    rows = []
    for sub, mask in subsets(cached).items():
        for p in ps:
            emb = embeddings(cached, p)[mask]
            for expansion in expansions:
                figures = score(emb, cached.labels[mask], expansion, dba="shortlist",
                                classes=cached.classes if cached.name == "omniglot" else None)
                rows.append(dict(set=cached.name, subset=sub, p=p, expand=expansion.n, **figures))
    return rows


def whitening_rows(cached: CachedSet, generic: CachedSet | None, kinds: Sequence[str], dims: Sequence[int | None],
                   shrinkages: Sequence[float], expansion: Expansion = NO_EXPANSION,
                   fit_cap: int = 2000) -> list[dict[str, Any]]:
    """``score`` on the held-out classes of whitened embeddings, the whitening fitted on: "other"
    (the set's other classes, at most ``fit_cap`` images, seeded), "self" (the evaluated images
    themselves, no labels: what fitting on one's own library does) and "generic" (``generic``'s
    other classes: a whitening shipped with the engine, fitted on photos)."""
    emb = embeddings(cached)
    held, labels = emb[cached.held], cached.labels[cached.held]
    other = np.flatnonzero(cached.other)
    if len(other) > fit_cap:
        other = np.sort(np.random.default_rng(0).choice(other, fit_cap, replace=False))
    sources = {"other": (emb[other], cached.labels[other]), "self": (held, None)}
    if generic is not None and generic.name != cached.name:
        sources["generic"] = (embeddings(generic)[generic.other], generic.labels[generic.other])
    classes = cached.classes if cached.name == "omniglot" else None
    rows = [dict(set=cached.name, fit="none", kind="-", dim=held.shape[1], shrinkage=None,
                 **score(held, labels, expansion, dba="shortlist", classes=classes))]
    for source, (x, x_labels) in sources.items():
        for kind in kinds:
            if kind == "learned" and x_labels is None:
                continue
            for dim in dims:
                for s in shrinkages:
                    if kind == "learned" and s == 0.0:
                        continue
                    out = whitened(x, x_labels, held, kind, dim, s)
                    rows.append(dict(set=cached.name, fit=source, kind=kind, dim=out.shape[1], shrinkage=s,
                                     **score(out, labels, expansion, dba="shortlist", classes=classes)))
    return rows


def whitened(fit_on: np.ndarray, fit_labels: np.ndarray | None, apply_to: np.ndarray, kind: str, dim: int | None,
             shrinkage: float) -> np.ndarray:
    """apply_to float32 [N, F] whitened by a whitening of ``kind`` fitted on fit_on float32 [M, F]."""
    if kind == "learned":
        w = fit_learned_whitening(fit_on, fit_labels, dim, shrinkage)
    else:
        w = fit_pca_whitening(fit_on, dim, shrinkage)
    return w.apply(apply_to)



# ------------------------------------------------------------------------- other encoders on the sets


def backbone_embeddings(cached: CachedSet, backbone: str, log: Callable[[str], None] = print) -> np.ndarray:
    """Unit embeddings float32 [N, D] of ``cached``'s images by the pretrained ``backbone`` ("lite0",
    "lite1", "lite2": what ``--model pretrained[-liteN]`` embeds, from the image files, each at its
    own input size). Only the rows ``backbone_rows`` scores are embedded (the held-out classes; for
    orl every image); the others are zero. Kept in the cache once computed."""
    if backbone == "lite0":
        return embeddings(cached)
    path = Path(cached.maps.filename).with_name(f"{cached.name}_{backbone}_emb.npy")
    if path.exists():
        return np.load(path)
    from engine.config import EncoderConfig
    from engine.embedding import embed_files
    from engine.encoder import build_encoder

    encoder = build_encoder(EncoderConfig(backbone=f"tf_efficientnet_{backbone}"))
    keep = np.flatnonzero(_embedded_rows(cached))
    start = time.perf_counter()
    out = embed_files(encoder, [cached.paths[i] for i in keep], batch_size=32, workers=1)
    if out.failures:
        raise SystemExit(f"cannot read {out.failures[0]}")
    log(f"{path.name}: {len(keep)} images in {time.perf_counter() - start:.0f} s")
    emb = np.zeros((len(cached.paths), encoder.dim), np.float32)
    emb[keep] = out.embeddings
    np.save(path, emb)
    return emb


def _embedded_rows(cached: CachedSet) -> np.ndarray:
    """bool [N]: the images ``backbone_embeddings`` embeds (orl is small enough for all of them)."""
    return np.ones(len(cached.paths), bool) if cached.name == "orl" else cached.held


def backbone_rows(cached: CachedSet, backbones: Sequence[str], expansions: Sequence[Expansion],
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``score`` of each pretrained backbone's embeddings with each expansion (DBA in the
    shortlist, as the engine ranks) on the subsets every backbone has embedded."""
    rows = []
    embedded = _embedded_rows(cached)
    for backbone in backbones:
        emb = backbone_embeddings(cached, backbone, log)
        for sub, mask in subsets(cached).items():
            if not embedded[mask].all():
                continue
            for expansion in expansions:
                figures = score(emb[mask], cached.labels[mask], expansion, dba="shortlist",
                                classes=cached.classes if cached.name == "omniglot" else None)
                rows.append(dict(set=cached.name, subset=sub, backbone=backbone, expand=expansion.n,
                                 alpha=expansion.alpha, **figures))
    return rows


def head_embeddings(cached: CachedSet, checkpoint: Path) -> np.ndarray:
    """Unit embeddings float32 [N, D] of the cached images by a checkpoint trained on the frozen
    pretrained lite0 (``--preset cpu-quick``: only its head and any whitening learned): its
    ``project`` applied to the average-pooled cached feature maps, as the encoder computes it from
    the files. Raises SystemExit when the checkpoint's backbone is not the pretrained one."""
    import torch

    from engine.encoder import load_encoder

    trained = load_encoder(str(checkpoint))
    frozen = load_encoder("pretrained")
    ours, theirs = trained.backbone.state_dict(), frozen.backbone.state_dict()
    if trained.config.pooling != "avg" or ours.keys() != theirs.keys() or not all(
            torch.equal(ours[k], theirs[k]) for k in ours):
        raise SystemExit(f"{checkpoint}: its backbone is not the frozen pretrained lite0; embed from the files")
    with torch.inference_mode():
        return trained.project(torch.from_numpy(pooled(cached.maps))).numpy().astype(np.float32)


def head_rows(cached: CachedSet, checkpoint: Path, expansions: Sequence[Expansion]) -> list[dict[str, Any]]:
    """``score`` on the held-out classes of a frozen-backbone checkpoint's embeddings
    (``head_embeddings``) with each expansion, beside the frozen encoder's."""
    rows = []
    labels = cached.labels[cached.held]
    classes = cached.classes if cached.name == "omniglot" else None
    for model, emb in (("frozen", embeddings(cached)), (str(checkpoint), head_embeddings(cached, checkpoint))):
        for expansion in expansions:
            figures = score(emb[cached.held], labels, expansion, dba="shortlist", classes=classes)
            rows.append(dict(set=cached.name, subset="held", model=model, expand=expansion.n,
                             alpha=expansion.alpha, **figures))
    return rows


def encoder_speed(models: Sequence[str], paths: Sequence[str], batch_size: int = 32, repeats: int = 3,
                  bare: bool = False) -> list[dict[str, Any]]:
    """Images/s of each named encoder (``--model NAME``) embedding ``paths`` from their files
    (decode in one worker process + forward, what ingest pays per image), best of ``repeats``
    after one warm-up pass; the models take turns, so a change in the machine's load falls on all.
    bare: the forward alone (``Encoder.embed``) on one seeded random batch float32 [len(paths), 3,
    S, S] at each encoder's own input size S, no decoding: steadier on a busy machine."""
    import torch

    from engine.embedding import embed_files
    from engine.encoder import load_encoder

    encoders = {name: load_encoder(name) for name in models}
    batches = {name: torch.randn(len(paths), *e.data_config["input_size"], generator=torch.Generator().manual_seed(0))
               for name, e in encoders.items()} if bare else {}
    best = {name: float("inf") for name in models}
    for attempt in range(repeats + 1):
        for name, encoder in encoders.items():
            start = time.perf_counter()
            if bare:
                for lo in range(0, len(paths), batch_size):
                    encoder.embed(batches[name][lo:lo + batch_size])
            else:
                out = embed_files(encoder, paths, batch_size=batch_size, workers=1)
                if out.failures:
                    raise SystemExit(f"cannot read {out.failures[0]}")
            if attempt:  # the first pass folds BatchNorm and warms the caches
                best[name] = min(best[name], time.perf_counter() - start)
    return [dict(model=name, input=int(encoders[name].data_config["input_size"][-1]), images=len(paths), bare=bare,
                 images_per_s=len(paths) / best[name], ms_per_image=1000 * best[name] / len(paths))
            for name in models]


def expansion_latency(home: Path, ns: Sequence[int], queries: int = 40, k: int = 10,
                      seed: int = 0) -> list[dict[str, Any]]:
    """Milliseconds per ``engine query`` search in the library at ``home`` (opened read-only) at each
    expansion n (alpha as the library's setting), for ``queries`` of its own images (seeded): their
    stored vectors are used, so this is search + expansion + shortlist re-ranking, no decoding. The
    settings take turns per query, so load changes fall on all of them; the median is reported."""
    from engine.expansion import library_expansion
    from engine.library import Library
    from engine.library_eval import library_vectors
    from engine.query import search_library

    library = Library(home, device="cpu", read_only=True)
    _, _, paths = library_vectors(library)
    chosen = [paths[i] for i in np.random.default_rng(seed).choice(len(paths), min(queries, len(paths)),
                                                                   replace=False)]
    search_library(library, chosen[:2], k=k, expand=0)  # loads the index and warms the caches
    times: dict[int, list[float]] = {n: [] for n in ns}
    for path in chosen:
        for n in ns:
            start = time.perf_counter()
            search_library(library, [path], k=k, expand=n)
            times[n].append(time.perf_counter() - start)
    alpha = library_expansion(library).alpha
    return [dict(images=len(paths), expand=n, alpha=alpha, ms_per_query=1000 * float(np.median(times[n])))
            for n in ns]
