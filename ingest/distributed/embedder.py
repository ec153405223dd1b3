"""The Ray Data actor of a distributed ingest: it loads the library's encoder once, then turns each
partition of files it is given into one shard (``engine-shards/1``), decoding with the project's
one preprocessing path (engine.loader / engine.preprocess) exactly as plain ingest does.

A partition always holds the same files within a run and its shard is named after it, so a task
that Ray retries (its actor died) writes the same shard again over the old one: idempotent. An
unreadable file is reported in the partition's result, never fatal.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import ModelMismatchError
from engine.faults import fault_point
from engine.shards import write_shard

if TYPE_CHECKING:
    from engine.loader import Decoded

SHARD_PREFIX = "part"


def shard_name(partition: int) -> str:
    """The shard a partition is written to: ``part-00007``."""
    return f"{SHARD_PREFIX}-{partition:05d}"


class ShardEmbedder:
    """A callable class for ``Dataset.map_batches`` (one instance per actor). Input batch: columns
    ``partition`` (int) and ``paths`` (a list of file names as bytes, exactly as the file system
    gives them) per row, one row per partition. Output: one row per partition with ``shard`` (its
    name, or "" when no file of it could be decoded), ``rows`` (files embedded), ``failed_paths``
    (bytes) with ``failed_reasons``, the wall seconds spent decoding and embedding, ``cpu_s``
    (the actor process's CPU seconds for the partition, shard writing included), and ``worker``,
    the actor's process id."""

    def __init__(self, encoder_path: str, identity: str, shards_dir: str, device: str, threads: int,
                 batch_size: int) -> None:
        import torch

        from engine.encoder import load_checkpoint, resolve_device
        from engine.preprocess import build_transform, draft_size_for

        torch.set_num_threads(max(1, threads))
        encoder = load_checkpoint(encoder_path, resolve_device(device))
        if encoder.identity() != identity:  # the library switched encoders since the driver looked
            raise ModelMismatchError(f"encoder file {encoder_path} is encoder {encoder.identity()}, not the "
                                     f"library's {identity}; run the ingest again")
        self.encoder = encoder
        self.transform = build_transform(encoder.data_config)
        self.draft_size = draft_size_for(encoder.data_config)
        self.shards_dir = shards_dir
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None  # decoding releases the GIL

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {k: [] for k in ("partition", "shard", "rows", "failed_paths", "failed_reasons",
                                                     "decode_s", "embed_s", "cpu_s", "worker")}
        for partition, paths in zip(batch["partition"], batch["paths"]):
            result = self.embed_partition(int(partition), [os.fsdecode(bytes(p)) for p in paths])
            for key, value in result.items():
                out[key].append(value)
        return out

    def embed_partition(self, partition: int, paths: list[str]) -> dict[str, Any]:
        """Decode and embed ``paths`` in batches, write the shard of ``partition``, and say what
        happened (see the class)."""
        from engine.loader import ImageFileDataset, collate_decoded

        dataset = ImageFileDataset(paths, self.transform, self.draft_size, with_facts=True)
        vectors: list[np.ndarray] = []
        good: list[Decoded] = []
        failed: list[Decoded] = []
        decode_s = embed_s = 0.0
        cpu = time.process_time()
        for start in range(0, len(paths), self.batch_size):
            positions = range(start, min(start + self.batch_size, len(paths)))
            began = time.perf_counter()
            mapper = self.pool.map if self.pool else map
            items = list(mapper(dataset.__getitem__, positions))
            decoded = collate_decoded(items)
            decode_s += time.perf_counter() - began
            failed.extend(decoded.failures)
            if decoded.images is not None:
                began = time.perf_counter()
                vectors.append(self.encoder.embed(decoded.images))
                embed_s += time.perf_counter() - began
                good.extend(decoded.items)
        name = ""
        if good:
            name = shard_name(partition)
            write_shard(self.shards_dir, name, np.concatenate(vectors), _columns(good))
            fault_point("ray-shard-written")  # a retried task writes the same shard again
        return {"partition": partition, "shard": name, "rows": len(good),
                "failed_paths": [os.fsencode(it.path) for it in failed],
                "failed_reasons": [it.error or "unknown error" for it in failed],
                "decode_s": decode_s, "embed_s": embed_s, "cpu_s": time.process_time() - cpu, "worker": os.getpid()}


def _columns(items: list[Decoded]) -> dict[str, list[Any]]:
    """The shard columns of decoded files: every fact plain ingest stores."""
    infos = [it.info for it in items]
    return {"path": [it.path for it in items], "content_hash": [it.content_hash for it in items],
            "bytes": [it.size for it in items], "mtime": [it.mtime for it in items],
            "width": [i.width if i else None for i in infos], "height": [i.height if i else None for i in infos],
            "format": [i.format if i else None for i in infos], "taken_at": [i.taken_at if i else None for i in infos],
            "camera": [i.camera if i else None for i in infos]}
