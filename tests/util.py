"""Small builders shared by tests: seeded images and a tiny random-init encoder checkpoint."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_image(path: Path, seed: int, size: tuple[int, int] = (40, 32), fmt: str | None = None) -> Path:
    """A seeded RGB image: a coloured gradient with a seeded rectangle and noise, distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, 3)
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(-120, 120, 3)
    arr = np.clip(base + grad + rng.normal(0, 25, (h, w, 3)), 0, 255)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


def make_folder(root: Path, n: int, *, seed0: int = 0, suffix: str = ".png") -> list[Path]:
    return [make_image(root / f"img_{i:03d}{suffix}", seed0 + i) for i in range(n)]


def make_class_tree(root: Path, classes: int, per_class: int, size: int = 40) -> list[Path]:
    """A folder-per-class tree where each class shares a colour scheme (so classes are separable)."""
    paths = []
    for c in range(classes):
        rng = np.random.default_rng(1000 + c)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            noise = np.random.default_rng(c * 100 + i).normal(0, 20, (size, size, 3))
            arr = np.clip(colour + noise, 0, 255).astype(np.uint8)
            p = root / f"class_{c}" / f"{i:02d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p)
            paths.append(p)
    return paths


def tiny_checkpoint(path: Path, backbone: str = "test_resnet", image_size: int = 32, head_dim: int | None = None) -> Path:
    """A random-init tiny timm encoder saved as an engine checkpoint (seeded, so reproducible)."""
    import torch

    from engine.config import EncoderConfig
    from engine.checkpoint import save_checkpoint
    from engine.encoder import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(backbone=backbone, pretrained=False, image_size=image_size, head_dim=head_dim))
    return save_checkpoint(enc, path)


def library_generation(db: Path) -> int:
    """The write generation recorded in the SQLite library database ``db`` (0 while unreadable)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(json.loads(row[0])) if row else 0
    except sqlite3.Error:
        return 0


def run_killed(cmd: list[str], env: dict[str, str], fault: str, when: float, db: Path) -> int:
    """Run the CLI ``cmd`` until it is killed with SIGKILL: at the ``when``-th pass of the fault
    point ``fault`` (``ENGINE_FAULT``), or, for ``fault == "outside"``, ``when`` seconds after its
    first commit shows in ``db`` (batches slowed to 50 ms so the run outlives the watcher). Returns
    its exit status (-9 when killed); a traceback on stderr fails the test."""
    env = dict(env)
    if fault == "outside":
        env["ENGINE_FAULT_DELAY"] = "0.05"
    else:
        env["ENGINE_FAULT"] = f"{fault}:{int(when)}"
    start = library_generation(db)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if fault == "outside":
            deadline = time.monotonic() + 120
            while proc.poll() is None and library_generation(db) <= start and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(when)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    return proc.returncode
