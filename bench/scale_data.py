"""Vectors for the million-photo benchmark: real embeddings of the shared photo sets, densified to
any size with the structure of a large photo collection, and their exact neighbours.

I.i.d. Gaussian vectors are useless for measuring approximate indexes (no index reaches recall
0.95 on them, since every point is nearly as far from a query as its nearest neighbour), and the
few thousand real photos here are too few. So the real embeddings are embedded once and cached
(``real_embeddings``), then each generated vector is a small perturbation of a mixture of a real
embedding and some of its real neighbours (``Densifier``): the noise lies mostly along the real
data's own principal directions (scaled by their spread), plus a little isotropic noise. What a
large collection has and a small one lacks (near-duplicates, bursts, many photos of one kind) is
what the densified set adds; ``neighbour_cosine`` measures how realistic it came out (the cosine
of a held-out query to its nearest indexed vector: about 0.8-0.9 for photo collections).

A million 1280-d vectors are 5.1 GB: they are generated shard by shard into a folder in the
engine's own import format (``write_database``: ``engine import`` takes it as it is), read back
memory-mapped, and exact search runs over them slice by slice (``exact_knn``, FAISS's
``knn_ground_truth``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from bench.errors import BenchError

if TYPE_CHECKING:
    from engine.progress import ProgressFn


DATASETS = Path("/work/shared/datasets")
SETS = ("caltech101-dev", "orl-faces", "omniglot-background")
DEFAULT_CACHE = Path("/tmp/engine-scale")  # never in the repository: a million vectors are 5 GB


def dataset_files(root: str | os.PathLike = DATASETS, sets: Sequence[str] = SETS) -> list[str]:
    """Every image file of the named sets under ``root``, sorted (a fixed list, so the cache key
    is stable). Raises BenchError when none is there."""
    from bench.samples import image_files

    files: list[str] = []
    for name in sets:
        folder = Path(root) / name
        if folder.is_dir():
            files += image_files(folder)
    if not files:
        raise BenchError(f"no photos found under {root} ({', '.join(sets)})")
    return files


def _cache_key(files: Sequence[str], model: str) -> str:
    h = hashlib.sha256(model.encode())
    for path in files:
        h.update(os.fsencode(path) + b"\0")
    return h.hexdigest()[:16]


def real_embeddings(cache: str | os.PathLike = DEFAULT_CACHE, files: Sequence[str] | None = None, *,
                    model: str = "pretrained", device: str = "cpu", batch_size: int = 32,
                    progress: ProgressFn | None = None) -> np.ndarray:
    """Embeddings float32 [N, D] (unit rows) of ``files`` (default: every photo of the shared
    sets) by ``model``, computed once and cached in ``cache`` (keyed by model and file list);
    files that cannot be decoded are left out. Raises BenchError when nothing could be embedded."""
    files = list(files) if files is not None else dataset_files()
    path = Path(cache) / f"real-{_cache_key(files, model)}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    from engine.atomic import atomic_path, write_atomic
    from engine.embedding import embed_files
    from engine.encoder import load_encoder

    encoder = load_encoder(model, device)
    done = embed_files(encoder, files, batch_size=batch_size, progress=progress)
    if not len(done.embeddings):
        raise BenchError(f"none of the {len(files)} photos could be embedded")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, done.embeddings.astype(np.float32), allow_pickle=False)
    write_atomic(path.with_suffix(".json"), json.dumps({"model": model, "files": len(files),
                                                        "embedded": len(done.embeddings),
                                                        "failed": len(done.failures)}))
    return done.embeddings


def fit_dimension(real: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """``real`` float32 [N, D] brought to ``dim`` columns with its geometry kept: fewer by its top
    principal directions (uncentred, so the mean direction every embedding shares stays), more by
    a random isometry into the larger space (every cosine unchanged); unit rows either way."""
    n, d = real.shape
    if dim == d:
        return real
    if dim < d:
        _, _, vt = np.linalg.svd(real.astype(np.float64), full_matrices=False)
        out = real @ vt[:dim].T.astype(np.float32)
    else:
        basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, d)))
        out = real @ basis.T.astype(np.float32)
    out = np.ascontiguousarray(out, np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


@dataclass(frozen=True)
class DensifyConfig:
    """How generated vectors scatter around the real ones.

    neighbours: the real neighbours of an anchor that may be mixed into it; mixed: how many are;
    mix: the largest weight a neighbour gets (0.3: the vector stays closer to its anchor);
    spread: noise along the real data's ``components`` principal directions, as a share of the
    real spread along each; noise: isotropic noise, as a share of a unit vector's length.

    The defaults were set so that a held-out query's nearest neighbour among a million vectors
    grown from the 9,532 shared photos has a median cosine of about 0.88 (0.85 among 100,000),
    against 0.84 among the real photos themselves."""

    neighbours: int = 10
    mixed: int = 2
    mix: float = 0.3
    spread: float = 0.6
    components: int = 256
    noise: float = 0.15


class Densifier:
    """Unit vectors float32 [n, dim] with the structure of a large photo collection, grown from
    real embeddings (see the module's docstring). ``sample(n, seed)`` draws independent vectors;
    the database and the queries use different seeds, so no query is in the database."""

    def __init__(self, real: np.ndarray, config: DensifyConfig = DensifyConfig()):
        import faiss

        if real.ndim != 2 or len(real) < config.neighbours + 1:
            raise BenchError(f"need at least {config.neighbours + 1} real embeddings to densify, got {real.shape}")
        self.real = np.ascontiguousarray(real, np.float32)
        self.config = config
        self.dim = real.shape[1]
        flat = faiss.IndexFlatIP(self.dim)
        flat.add(self.real)
        self.near = flat.search(self.real, config.neighbours + 1)[1][:, 1:]  # [N, neighbours], itself left out
        centred = self.real - self.real.mean(axis=0)
        _, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        r = min(config.components, len(s))
        scale = s[:r] / np.sqrt(len(real))  # the real spread along each direction
        self.directions = np.ascontiguousarray(vt[:r] * scale[:, None] * config.spread, np.float32)  # [r, dim]

    def sample(self, n: int, seed: int, block: int = 16384) -> np.ndarray:
        """``n`` unit vectors float32 [n, dim], drawn with ``seed``, ``block`` at a time (so the
        temporaries stay small beside the result)."""
        out = np.empty((n, self.dim), np.float32)
        for i, start in enumerate(range(0, n, block)):
            out[start:start + block] = self._block(min(block, n - start), np.random.default_rng([seed, i]))
        return out

    def _block(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` vectors float32 [n, dim] drawn from ``rng``: anchor, mixed-in neighbours, noise."""
        c = self.config
        anchors = rng.integers(0, len(self.real), n)
        base = self.real[anchors]
        out = base.copy()
        picks = self.near[anchors[:, None], rng.integers(0, c.neighbours, (n, c.mixed))]  # [n, mixed]
        weights = rng.uniform(0.0, c.mix, (n, c.mixed)).astype(np.float32)
        for j in range(c.mixed):
            out += weights[:, j:j + 1] * (self.real[picks[:, j]] - base)
        out += rng.standard_normal((n, len(self.directions)), dtype=np.float32) @ self.directions
        out += rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(c.noise / np.sqrt(self.dim))
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    def chunks(self, n: int, seed: int, chunk: int = 50_000) -> Iterator[np.ndarray]:
        """``n`` vectors in slices of ``chunk``, each slice drawn whole with its own seed (the
        last one cut short), so the first m vectors are the same whatever ``n`` is."""
        for i, start in enumerate(range(0, n, chunk)):
            yield self.sample(chunk, seed * 1_000_003 + i)[:n - start]

    def key(self) -> str:
        """A short hash of the real vectors and the config: names the files made from them."""
        h = hashlib.sha256(self.real.tobytes())
        h.update(json.dumps(self.config.__dict__, sort_keys=True).encode())
        return h.hexdigest()[:12]


@dataclass(frozen=True)
class ModelRef:
    """The encoder a set of vectors claims to come from: ``spec`` (``pretrained`` or a
    checkpoint path, what ``engine import --model`` takes) and its ``identity``."""

    spec: str
    identity: str
    dim: int


def model_for(dim: int, cache: str | os.PathLike = DEFAULT_CACHE) -> ModelRef:
    """The encoder that vectors of ``dim`` are imported as: the pretrained encoder at its own
    width; at any other width, the pretrained backbone with a seeded ``dim``-wide projection head,
    saved once as a checkpoint in ``cache`` (a library needs an encoder of its vectors' width)."""
    from engine.checkpoint import save_checkpoint
    from engine.config import EncoderConfig
    from engine.encoder import build_encoder, load_checkpoint, load_encoder

    import torch

    pretrained = load_encoder("pretrained", "cpu")
    if dim == pretrained.dim:
        return ModelRef("pretrained", pretrained.identity(), dim)
    path = Path(cache) / f"encoder-{dim}d.pt"
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(build_encoder(EncoderConfig(head_dim=int(dim)), "cpu"), path)
    return ModelRef(os.fspath(path), load_checkpoint(path, "cpu").identity(), dim)


PHOTO_MTIME = 1_600_000_000.0  # the mtime every generated row records (and ``make_photo_files`` gives)


def photo_root(cache: str | os.PathLike = DEFAULT_CACHE) -> str:
    """The folder the generated rows' paths lie in (absolute)."""
    return os.path.abspath(os.path.join(cache, "photos"))


def row_path(position: int, root: str) -> str:
    """The path of generated row ``position`` under ``root``: a thousand per folder, as photo
    libraries are."""
    return f"{root}/{position // 1000:05d}/{position:07d}.jpg"


def write_database(densifier: Densifier, n: int, model: ModelRef, cache: str | os.PathLike = DEFAULT_CACHE, *,
                   seed: int = 1, shard_rows: int = 100_000, progress: ProgressFn | None = None) -> Path:
    """A folder of ``n`` densified vectors drawn with ``seed``, in the engine's own import format
    (``engine-shards/1``: ``engine import`` takes it as it is): shards of ``shard_rows`` vectors
    (float32 [rows, dim] ``.npy``) whose rows are the paths ``row_path(position)`` under
    ``photo_root(cache)``, each recorded as an empty file of mtime PHOTO_MTIME (what
    ``make_photo_files`` creates), claiming ``model``'s identity. Generated slice by slice (a
    million 1280-d vectors never sit in memory at once) and reused when its manifest is there
    (written last). Returns the folder."""
    from engine.shards import shard_names, write_manifest, write_shard

    folder = Path(cache) / f"db-{densifier.key()}-{model.identity}-{n}-s{seed}-{shard_rows}"
    if (folder / "manifest.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    root = photo_root(cache)
    names = shard_names(-(-n // shard_rows))
    start = 0
    for name, part in zip(names, densifier.chunks(n, seed, shard_rows)):
        rows = len(part)
        write_shard(folder, name, part, {"path": [row_path(i, root) for i in range(start, start + rows)],
                                         "bytes": [0] * rows, "mtime": [PHOTO_MTIME] * rows})
        start += rows
        if progress:
            progress(start, n)
    write_manifest(folder, model.identity, densifier.dim, names)
    return folder


def make_photo_files(n: int, cache: str | os.PathLike = DEFAULT_CACHE) -> str:
    """Create the ``n`` empty files the generated rows name (the ones missing), with the mtime
    they record, so commands that look at the disk (``engine doctor``) find a library whose
    files are all in place. Returns their root folder."""
    root = photo_root(cache)
    for folder in range(-(-n // 1000)):
        path = f"{root}/{folder:05d}"
        if os.path.isdir(path) and len(os.listdir(path)) == min(1000, n - folder * 1000):
            continue
        os.makedirs(path, exist_ok=True)
        for position in range(folder * 1000, min(n, folder * 1000 + 1000)):
            name = row_path(position, root)
            with open(name, "ab"):
                pass
            os.utime(name, (PHOTO_MTIME, PHOTO_MTIME))
    return root


def open_database(folder: str | os.PathLike) -> list[np.ndarray]:
    """The vectors of a ``write_database`` folder, shard by shard, memory-mapped read-only:
    float32 [rows, dim] each, in row order."""
    from engine.shards import read_manifest

    manifest = read_manifest(folder)
    return [np.load(manifest.files(name)[0], mmap_mode="r", allow_pickle=False) for name in manifest.shards]


def slices(parts: Sequence[np.ndarray], chunk: int = 50_000) -> Iterator[np.ndarray]:
    """The rows of ``parts`` (float32 [rows, dim] arrays, e.g. memory maps), in order, as
    contiguous in-memory slices of at most ``chunk`` rows."""
    for vectors in parts:
        for start in range(0, len(vectors), chunk):
            yield np.ascontiguousarray(vectors[start:start + chunk], np.float32)


def exact_knn(parts: Sequence[np.ndarray], queries: np.ndarray, k: int, chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product of float32 [Q, dim] ``queries`` among the rows of
    ``parts`` (read slice by slice): (scores float32 [Q, k], row positions int64 [Q, k]), best
    first (FAISS's ``knn_ground_truth``)."""
    import faiss
    from faiss.contrib.exhaustive_search import knn_ground_truth

    return knn_ground_truth(np.ascontiguousarray(queries, np.float32), slices(parts, chunk), k,
                            metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)


def neighbour_cosine(scores: np.ndarray) -> dict[str, float]:
    """How close the nearest neighbours are, from exact scores float32 [Q, k] (cosines, best
    first): median cosine of the 1st and of the k-th neighbour, and the 10th and 90th percentile
    of the 1st (a realistic photo collection: about 0.8-0.9)."""
    first, last = scores[:, 0], scores[:, -1]
    return {"nn1_p50": round(float(np.median(first)), 4), "nn1_p10": round(float(np.percentile(first, 10)), 4),
            "nn1_p90": round(float(np.percentile(first, 90)), 4), "nnk_p50": round(float(np.median(last)), 4)}
