"""A million photos, the whole library: ``engine import`` of the densified vectors
(``bench.scale_data``), then the commands people run on it, each the real CLI in a fresh process,
timed by wall clock with its peak resident memory (the child's own, from ``wait4``):

- ``engine import`` (rows/s);
- ``engine ingest`` of ``photos`` new real photos into it, against the same photos into an empty
  library (the ratio is the target: a large library must not make adding to it slower);
- a cold ``engine query`` split into phases (``bench.cold_query``), and its peak memory;
- ``engine info``, ``engine doctor``, ``engine reindex``;
- disk per photo: every file in the library's home, by kind.

The rows' paths name empty files that are created beside the shards first, so ``engine doctor``
checks a library whose files are all in place, as it would check a real one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from bench.errors import BenchError
from bench.scale_data import DEFAULT_CACHE, dataset_files, make_photo_files

if TYPE_CHECKING:
    from engine.progress import ProgressFn


@dataclass(frozen=True)
class LibraryBenchConfig:
    """n rows of ``dim`` imported; ``photos`` real photos ingested into it and into an empty
    library, ``repeats`` times each, interleaved (the million-row library forgets them between
    rounds with ``engine remove``); ``ingest_workers``: decode processes of those ingests;
    ``index_type``: a FAISS factory the library is given before the import, instead of the
    engine's own choice (``auto``); ``keep``: leave the library in the cache afterwards (else it
    is deleted)."""

    n: int = 1_000_000
    dim: int = 1280
    photos: int = 1000
    repeats: int = 1
    ingest_workers: int = 1
    cold_runs: int = 3
    index_type: str | None = None
    device: str = "cpu"
    seed: int = 0
    keep: bool = False
    cache: Path = DEFAULT_CACHE


@dataclass(frozen=True)
class Measured:
    """One command run in a child process: wall seconds, its peak resident set (MiB), its exit
    status and what it printed."""

    wall_s: float
    peak_rss_mib: float
    status: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        """The last line of stdout parsed as JSON (what ``--json`` prints). Raises BenchError."""
        try:
            return json.loads(self.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise BenchError(f"expected JSON, got {self.stdout[-300:]!r} ({self.stderr[-300:]!r})") from None

    def figures(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "peak_rss_mib": round(self.peak_rss_mib, 1)}


TIME = "/usr/bin/time"  # GNU time: a small process between this one and the measured command


def run_measured(argv: Sequence[str], env: dict[str, str] | None = None, *, ok: Sequence[int] = (0,),
                 timeout_s: float = 7200.0) -> Measured:
    """Run ``argv`` to its end; its wall time and its own peak RSS. A child's peak as the kernel
    keeps it includes the memory of the process it was forked from (this one, with the vectors
    it may hold), so the command is started through GNU ``time`` where it is installed, a
    process of a few MB, which reports the peak of its child; elsewhere the peak is the
    direct child's (``os.wait4``), an upper bound. Raises BenchError naming the command and the
    last line of its stderr when its status is not in ``ok``, or when it outlives ``timeout_s``."""
    import tempfile

    through_time = os.access(TIME, os.X_OK)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="engine-rss-") as peak:
        command = [TIME, "-q", "-o", peak.name, "-f", "%M", *argv] if through_time else list(argv)
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            _, status, usage = os.wait4(proc.pid, 0) if timeout_s is None else _wait(proc, t0 + timeout_s)
        except TimeoutError:
            raise BenchError(f"`{' '.join(map(str, argv[3:]))}` took more than {timeout_s:.0f} s") from None
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        kib = float(usage.ru_maxrss)
        if through_time:
            text = Path(peak.name).read_text().strip().splitlines()
            kib = float(text[-1]) if text and text[-1].isdigit() else kib
        out.seek(0)
        err.seek(0)
        measured = Measured(wall, kib / 1024.0, proc.returncode, out.read().decode(errors="replace"),
                            err.read().decode(errors="replace"))
    if measured.status not in ok:
        last = (measured.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BenchError(f"`{' '.join(map(str, argv[3:]))}` failed (exit status {measured.status}): {last}")
    return measured


def _wait(proc: subprocess.Popen, deadline: float) -> tuple[int, int, Any]:
    """``os.wait4`` of ``proc`` polled until ``deadline`` (perf_counter seconds); TimeoutError,
    having killed it and its children (its own session), past that."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.perf_counter() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            raise TimeoutError
        time.sleep(0.05)


def engine(home: str | os.PathLike, *args: str, device: str = "cpu") -> list[str]:
    """The argv of the real ``engine`` command on the library in ``home``."""
    return [sys.executable, "-c", "from engine.cli import main; main()", "--home", os.fspath(home),
            "--device", device, *map(str, args)]


def home_bytes(home: str | os.PathLike) -> dict[str, int]:
    """Bytes of every file in the library's home, by kind: database (with its journal files),
    index (with its record), encoder (checkpoint and scripted copy), other; and ``total``."""
    kinds = {"database": 0, "index": 0, "encoder": 0, "other": 0}
    for path in Path(home).rglob("*"):
        if not path.is_file():
            continue
        name = path.name
        kind = ("database" if name.startswith("library.db") else "index" if name.startswith("index.")
                else "encoder" if name.startswith("encoder.") else "other")
        kinds[kind] += path.stat().st_size
    kinds["total"] = sum(kinds.values())
    return kinds


def _ingest(home: Path, photos: Sequence[str], config: LibraryBenchConfig, env: dict[str, str]) -> dict[str, Any]:
    done = run_measured(engine(home, "ingest", *photos, "--json", "--workers", config.ingest_workers,
                               device=config.device), env)
    summary = done.json()
    if summary.get("added", 0) + summary.get("duplicates", 0) != len(photos):
        raise BenchError(f"the ingest into {home} added {summary.get('added')} of {len(photos)} photos")
    return dict(done.figures(), added=summary.get("added"), stages=summary.get("stages"))


def bench_ingest_pair(home: Path, empty_root: Path, photos: Sequence[str], config: LibraryBenchConfig,
                      env: dict[str, str]) -> dict[str, Any]:
    """``engine ingest`` of ``photos`` into an empty library and into the library in ``home``,
    ``config.repeats`` times, interleaved; each round the big library forgets them again
    (``engine remove``) and the empty one starts afresh. Best wall time of each side, and their
    ratio (big / empty)."""
    folder = os.path.commonpath(list(photos))
    rounds: list[dict[str, Any]] = []
    for number in range(max(1, config.repeats)):
        fresh = empty_root / f"empty-{number}"
        shutil.rmtree(fresh, ignore_errors=True)
        empty = _ingest(fresh, photos, config, env)
        shutil.rmtree(fresh, ignore_errors=True)
        big = _ingest(home, photos, config, env)
        if number + 1 < max(1, config.repeats):
            run_measured(engine(home, "remove", folder, device=config.device), env)
        rounds.append({"empty": empty, "big": big})
    best_empty = min(r["empty"]["wall_s"] for r in rounds)
    best_big = min(r["big"]["wall_s"] for r in rounds)
    # a new library first builds and saves its encoder (the ingest's "model" stage), once in its
    # life: adding photos is the rest, and that is what the ratio compares
    adding_empty = min(r["empty"]["wall_s"] - _model_s(r["empty"]) for r in rounds)
    adding_big = min(r["big"]["wall_s"] - _model_s(r["big"]) for r in rounds)
    return {"photos": len(photos), "rounds": rounds, "empty_wall_s": best_empty, "big_wall_s": best_big,
            "wall_ratio": round(best_big / best_empty, 3), "adding_empty_s": round(adding_empty, 2),
            "adding_big_s": round(adding_big, 2), "ratio": round(adding_big / adding_empty, 3)}


def _model_s(ingest: dict[str, Any]) -> float:
    return float((ingest.get("stages") or {}).get("model", 0.0))


def _preset_index_type(home: Path, factory: str, device: str) -> None:
    """Make the library in ``home`` (new) with the pretrained encoder and index type ``factory``,
    so the import builds that type rather than the one the engine would choose."""
    from engine.library import Library

    library = Library(home, device=device)
    try:
        library.set_model("pretrained", index_factory=factory)
    finally:
        library.close()


def run_scale_library(config: LibraryBenchConfig = LibraryBenchConfig(), *,
                      progress: ProgressFn | None = None) -> dict[str, Any]:
    """The library half of the million-photo benchmark (see the module's docstring), JSON-ready."""
    from bench.query import _child_env, bench_cold_query
    from bench.samples import query_image
    from bench.scale import ScaleConfig, prepare_data

    env = _child_env()
    data = prepare_data(ScaleConfig(n=config.n, dim=config.dim, queries=10, tune_queries=10, seed=config.seed,
                                    cache=config.cache), progress)
    if data["model"].spec != "pretrained":
        raise BenchError(f"the library benchmark ingests real photos, so it needs the pretrained encoder's "
                         f"dimension, not {config.dim}")
    t0 = time.perf_counter()
    make_photo_files(config.n, config.cache)
    files_s = time.perf_counter() - t0
    work = config.cache / f"library-run-{config.n}"
    shutil.rmtree(work, ignore_errors=True)
    home = work / "home"
    out: dict[str, Any] = {"facts": dict(data["facts"], photo_files_s=round(files_s, 1),
                                         index_type=config.index_type or "auto")}
    try:
        if config.index_type:
            _preset_index_type(home, config.index_type, config.device)
        done = run_measured(engine(home, "import", data["folder"], "--json", device=config.device), env)
        summary = done.json()
        if summary.get("added") != config.n:
            raise BenchError(f"the import added {summary.get('added')} rows of {config.n}")
        index_s = float(summary.get("stages", {}).get("index", 0.0))
        out["import"] = dict(done.figures(), rows_per_s=round(config.n / done.wall_s, 1), index_s=round(index_s, 1),
                             rows_per_s_before_index=round(config.n / max(1e-9, done.wall_s - index_s), 1),
                             report=summary)
        out["disk_after_import"] = home_bytes(home)
        photos = dataset_files()[:config.photos]
        out["ingest"] = bench_ingest_pair(home, work, photos, config, env)
        image = os.fspath(query_image())  # not in the library: decoded and embedded, as a new photo is
        out["query_image"] = image
        out["cold_query"] = bench_cold_query(home, image, device=config.device, runs=config.cold_runs, cli=False)
        out["query"] = run_measured(engine(home, "query", image, "-k", 10, "--json", "--no-server",
                                           device=config.device), env).figures()
        out["info"] = run_measured(engine(home, "info", "--json", device=config.device), env).figures()
        doctor = run_measured(engine(home, "doctor", "--json", device=config.device), env, ok=(0, 1))
        out["doctor"] = dict(doctor.figures(), ok=doctor.json().get("ok"),
                             findings=[f["code"] for f in doctor.json().get("findings", [])])
        reindex = run_measured(engine(home, "reindex", "--json", device=config.device), env)
        out["reindex"] = dict(reindex.figures(), report=reindex.json())
        rows = config.n + config.photos
        disk = home_bytes(home)
        out["disk"] = dict(disk, rows=rows, bytes_per_photo=round(disk["total"] / rows, 1))
    finally:
        if not config.keep:
            shutil.rmtree(work, ignore_errors=True)
    return out


def format_scale_library(results: dict[str, Any]) -> str:
    """The library half as text: one line per command, and disk per photo."""
    from bench.report import text_table

    f = results["facts"]
    imp, ing = results["import"], results["ingest"]
    lines = [f"library of {f['n']:,} imported rows x {f['dim']}-d (densified from {f['real_vectors']:,} real "
             f"embeddings), index {f['index_type']}, then {ing['photos']} real photos"]
    rows = [["engine import", f"{imp['wall_s']:.1f}", imp["peak_rss_mib"],
             f"{imp['rows_per_s']:,.0f} rows/s ({imp['rows_per_s_before_index']:,.0f} before its index build of "
             f"{imp['index_s']} s)"]]
    for side in ("empty", "big"):
        best = min((r[side] for r in ing["rounds"]), key=lambda r: r["wall_s"])
        what = "into an empty library" if side == "empty" else f"into the {f['n']:,}-row library"
        note = (f"{ing['adding_empty_s']} s without the new library's encoder set-up" if side == "empty" else
                f"{ing['adding_big_s']} s likewise: ratio {ing['ratio']} (wall {ing['wall_ratio']})")
        rows.append([f"engine ingest {ing['photos']} photos {what}", f"{best['wall_s']:.1f}", best["peak_rss_mib"],
                     note])
    rows.append(["engine query (cold, a new photo)", f"{results['query']['wall_s']:.2f}",
                 results["query"]["peak_rss_mib"], ""])
    rows.append(["engine info", f"{results['info']['wall_s']:.2f}", results["info"]["peak_rss_mib"], ""])
    doctor = results["doctor"]
    rows.append(["engine doctor", f"{doctor['wall_s']:.1f}", doctor["peak_rss_mib"],
                 "ok" if doctor["ok"] else "findings: " + ", ".join(doctor["findings"])])
    re = results["reindex"]
    rows.append(["engine reindex", f"{re['wall_s']:.1f}", re["peak_rss_mib"], re["report"].get("index", "")])
    lines += text_table(["command", "wall s", "peak RSS MiB", ""], rows)
    c = results["cold_query"]
    lines.append("  cold `engine query` phases, seconds (best of runs): "
                 + ", ".join(f"{key[:-2]} {c[key]}" for key in ("interpreter_start_s", "import_s", "open_s",
                                                                  "index_load_s", "script_load_s", "model_load_s",
                                                                  "embed_s", "search_s", "metadata_s", "other_s",
                                                                  "wall_s") if key in c))
    d = results["disk"]
    lines.append(f"  disk: {d['total'] / 2**30:.2f} GiB for {d['rows']:,} photos = {d['bytes_per_photo']:,.0f} bytes a "
                 f"photo (database {d['database'] / d['rows']:,.0f}, index {d['index'] / d['rows']:,.0f}, "
                 f"encoder and other {(d['encoder'] + d['other']) / d['rows']:,.0f})")
    return "\n".join(lines)
