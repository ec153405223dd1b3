"""What the command line shows while it works: progress on stderr.

``Progress`` is the one adapter from the library's ``ProgressFn`` calls (done, total) to a person:
a tqdm bar with total and ETA when stderr is a terminal; otherwise (a log file, ``nohup``, a pipe)
a plain line at the first count and then one every ``ENGINE_PROGRESS_EVERY`` seconds (default 5),
so a log shows life without filling up. A library call says that its slow part begins (after
checking its input: a mistake stays a one-line error) with ``fn(0, None)``; that prints the
``waiting`` line at once ("loading the encoder..."). ENGINE_PROGRESS=1 shows progress even where
the command would keep quiet (``--json``); ENGINE_PROGRESS=0 silences it.

Standard library only at import: tqdm is imported when a bar is drawn.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

DEFAULT_EVERY_S = 5.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_enabled(default: bool) -> bool:
    """Whether a command shows progress: ``default`` unless ENGINE_PROGRESS says 1 or 0."""
    forced = os.environ.get("ENGINE_PROGRESS", "").strip()
    if forced in ("0", "false", "no", "off"):
        return False
    return True if forced else default


class Progress:
    """A ``ProgressFn`` (``fn(done, total)``) that draws on ``stream`` (default stderr).

    desc: the name every line starts with; unit: what is counted ("img", "vectors"); waiting: what
    the first ``fn(0, None)`` says is happening. A ``done`` that goes back down starts a new phase
    (a new bar, or a new plain line at once)."""

    def __init__(self, desc: str, *, unit: str = "img", enabled: bool = True, stream: IO[str] | None = None,
                 every_s: float | None = None, waiting: str | None = None) -> None:
        self.desc, self.unit, self.waiting = desc, unit, waiting
        self._said_waiting = False
        self.enabled = progress_enabled(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s if every_s is not None else float(os.environ.get("ENGINE_PROGRESS_EVERY",
                                                                                 DEFAULT_EVERY_S))
        try:
            self.terminal = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.terminal = False
        self.bar: Any = None
        self._phase_start = 0.0
        self._phase_done0 = 0
        self._last_line = 0.0
        self._last_done = -1

    def start(self, message: str) -> None:
        """Say at once what the command is doing before its first count (one plain line)."""
        if self.enabled:
            self._write(f"{self.desc}: {message}")

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if done == 0 and total is None:  # the slow part begins; nothing is counted yet
            if self.waiting and not self._said_waiting:
                self._said_waiting = True
                self._write(f"{self.desc}: {self.waiting}")
            return
        if self.terminal:
            self._draw_bar(done, total)
        else:
            self._plain(done, total)

    def _draw_bar(self, done: int, total: int | None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self.stream, dynamic_ncols=True)
        if done < self.bar.n:
            self.bar.reset(total=total)
        elif total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def _plain(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        new_phase = done < self._last_done or self._last_done < 0
        if new_phase:
            self._phase_start, self._phase_done0 = now, done
        finished = total is not None and done >= total and done != self._last_done
        due = now - self._last_line >= self.every_s
        self._last_done = done
        if new_phase or finished or due:
            self._last_line = now
            self._write(self.line(done, total, now - self._phase_start, done - self._phase_done0))

    def line(self, done: int, total: int | None, elapsed: float, counted: int) -> str:
        """One plain progress line: count, share, rate and ETA where they are known."""
        parts = [f"{done:,}/{total:,} {self.unit}" if total is not None else f"{done:,} {self.unit}"]
        if total:
            parts.append(f"({100.0 * done / total:.0f}%)")
        if counted > 0 and elapsed > 0.5:
            rate = counted / elapsed
            parts.append(f"{rate:,.1f} {self.unit}/s")
            if total is not None and done < total:
                parts.append(f"ETA {_clock((total - done) / rate)}")
        return f"{self.desc}: " + " ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
