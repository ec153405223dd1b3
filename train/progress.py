"""The terminal view of a training run, for the CLI: a tqdm bar per phase and a line per epoch.

``train`` reports progress through the engine's one callback type, ``engine.progress.ProgressFn``
``(done, total)``, starting each phase (caching a view's features, an epoch's steps) from
``done = 0``, and hands each epoch's record to ``on_epoch``. ``TrainProgress`` is both: pass it as
``progress`` and its ``epoch_end`` as ``on_epoch``. Library code passes neither.
"""

from __future__ import annotations

import sys
from typing import IO, Any


class TrainProgress:
    """tqdm bars on ``file`` (stderr by default): one per phase, named after the epoch it belongs to
    (phases before the first epoch record are the preparation: feature caching), and a summary line
    per finished epoch (loss, active share, validation figures, "best")."""

    def __init__(self, file: IO[str] | None = None, resume: bool = False):
        self.file = file if file is not None else sys.stderr
        self.bar: Any = None
        self.epoch: int | None = None  # the last epoch whose record arrived
        self.before = "resuming" if resume else "preparing"

    def __call__(self, done: int, total: int | None) -> None:
        from tqdm import tqdm

        if self.bar is None or done == 0:
            self._close()
            desc = self.before if self.epoch is None else f"epoch {self.epoch + 1}"
            self.bar = tqdm(total=total, desc=desc, file=self.file, leave=False, dynamic_ncols=True)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def epoch_end(self, record: dict) -> None:
        """Close the epoch's bar and print its summary line."""
        from tqdm import tqdm

        self._close()
        self.epoch = int(record["epoch"])
        tqdm.write(f"epoch {self.epoch}: {summary(record)}", file=self.file)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary(record: dict) -> str:
    """One line of an epoch's record: 'loss 0.1234, val 0.2345, active 0.50, R@1 0.812, ..., best'."""
    parts = []
    for key, fmt in (("train_loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("active", "active {:.2f}"),
                     ("recall@1", "R@1 {:.3f}"), ("map@r", "MAP@R {:.3f}"), ("roc_auc", "AUC {:.3f}")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    if record.get("best"):
        parts.append("best")
    return ", ".join(parts)
