"""Stored vectors as float16: the retrieval cost on real embeddings (target: recall@10 and MAP@R
within 0.001 of float32) and the bytes per photo of a SQLite library.

    .venv/bin/python benchmarks/vector_storage.py --embeddings /tmp/storage/caltech101-dev.npz \
        --embeddings /tmp/storage/orl-faces.npz --rows 50000

Each ``--embeddings`` file is an ``.npz`` with ``embeddings`` (float32 [N, D], the pretrained
encoder's output for a folder-per-class set) and ``labels`` (int [N]); ``--embed DIR --cache
FILE.npz`` makes one (every image of DIR through the library's default encoder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _common import emit, parser

from bench.vector_storage import float16_cost, sqlite_bytes_per_photo


def _embed(folder: str, cache: str) -> None:
    from engine.embedding import embed_files
    from engine.encoder import load_encoder
    from engine.files import list_class_folder

    paths, labels, _ = list_class_folder(folder)
    done = embed_files(load_encoder("pretrained", "cpu"), paths, batch_size=32)
    np.savez(cache, embeddings=done.embeddings, labels=labels[done.positions])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--embeddings", action="append", default=[], help=".npz of embeddings and labels (repeatable)")
    p.add_argument("--embed", help="a folder-per-class set to embed into --cache first")
    p.add_argument("--cache", help="where --embed writes its .npz")
    p.add_argument("--rows", type=int, default=50_000, help="synthetic rows for the size figure (0: skip)")
    p.add_argument("--dim", type=int, default=1280)
    args = p.parse_args()
    files = list(args.embeddings)
    if args.embed:
        if not args.cache:
            p.error("--embed needs --cache")
        if not Path(args.cache).exists():
            _embed(args.embed, args.cache)
        files.append(args.cache)
    sections = {}
    for name in files:
        data = np.load(name)
        sections[f"float16_cost {Path(name).stem}"] = float16_cost(data["embeddings"], data["labels"])
    if args.rows:
        sections["sqlite_bytes_per_photo"] = sqlite_bytes_per_photo(args.rows, args.dim)
    emit(args, sections)


if __name__ == "__main__":
    main()
