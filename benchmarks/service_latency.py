"""Service latency: what `engine serve` costs and saves.

    .venv/bin/python benchmarks/service_latency.py                 # a library of the shipped sample
    .venv/bin/python benchmarks/service_latency.py --home DIR      # an existing library
    .venv/bin/python benchmarks/service_latency.py --json          # the figures as one JSON object

Prints:
  * warm search-by-upload through the service (HTTP, multipart, decode, embed, search, records),
    p50/p99, against the same work done bare in this process (decode, embed, search, records),
    and the CPU time each costs (the service: all its threads plus this client's; bare: this
    process), which a shared machine disturbs far less than the wall time;
  * `engine query IMAGE -k 10` wall time: a cold process searching in-process (--no-server), and
    the same command answered by the running service;
  * requests per second at 1, 4 and 8 concurrent clients, for search-by-id and search-by-upload.

The query image is one the library did not index (the sample's held-out query photos), so the
upload is really decoded and embedded. Standard library and engine imports only.

What each side pays, so that the comparison stays fair: both rank with the library's query
expansion setting through ``rank_expanded`` (as ``engine query`` and the service do), read once
before the loop, as the service holds it; both decode the same bytes from memory with the same
decoder. The service's side is everything a client of it pays: building the multipart request
(about 0.02 ms), HTTP both ways on loopback, the server's work, and parsing the JSON answer with
the engine's own client (the one ``engine query`` uses). The two alternate, one search each, with
the first few of each left out as warm-up.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "engine" / "sample"


def engine_command() -> list[str]:
    script = Path(sys.executable).with_name("engine")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from engine.cli import main; main()"]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGINE_HOME", "ENGINE_DATABASE_URL", "ENGINE_FAULT"))}
    env.update(ENGINE_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return env


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


# -- the library and the server -------------------------------------------------------------------

def build_library(home: Path) -> None:
    """Ingest the shipped sample with the pretrained encoder (offline weights package)."""
    subprocess.run([*engine_command(), "--home", str(home), "--device", "cpu", "ingest", str(SAMPLE / "library"),
                    "--json"], env=child_env(), check=True, capture_output=True)


class Server:
    """`engine serve --port 0` on ``home``, found through the service.json it writes."""

    def __init__(self, home: Path, workers: int | None):
        from engine.service.address import read_address

        extra = ["--workers", str(workers)] if workers else []
        self.proc = subprocess.Popen([*engine_command(), "--home", str(home), "--device", "cpu", "serve", "--port", "0",
                                      *extra],
                                     env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            address = read_address(home)
            if address is not None and address.pid == self.proc.pid:
                self.address = address
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"engine serve failed: {self.proc.stderr.read() if self.proc.stderr else ''}")
            time.sleep(0.1)
        self.stop()
        raise SystemExit("engine serve did not start within 180 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


# -- measurements ---------------------------------------------------------------------------------

def process_cpu_s(pid: int) -> float | None:
    """CPU seconds all threads of process ``pid`` have run (Linux: nanoseconds from each thread's
    schedstat), or None where that cannot be read."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def upload_latency(home: Path, server: Server, data: bytes, repeats: int, threads: int) -> dict[str, list[float]]:
    """Per search of ``data``: ``served`` and ``bare`` wall seconds, ``served_cpu`` and
    ``bare_cpu`` CPU seconds (empty where the server's CPU time cannot be read), and ``health``
    wall seconds of an empty request, all measured in alternation so that each sees the same
    machine. Bare: decode, preprocess, embed, and the engine's ranking (search, query expansion as
    the library sets it, records, aliases) with ``threads`` torch threads (what one of the
    service's inference workers gets). Through the service: all that plus HTTP, multipart and
    JSON (the indexed-bytes lookup only when an indexed file has the upload's size: not for this
    held-out photo)."""
    import torch

    from engine.expansion import library_expansion, rank_expanded
    from engine.library import Library
    from engine.preprocess import build_transform, draft_size_for, open_image
    from engine.service.client import ServiceClient
    from engine.service.state import limit_blas_threads

    torch.set_num_threads(threads)
    blas = limit_blas_threads(threads)  # as the service limits its own
    library = Library(home, device="cpu")
    encoder = library.encoder()
    index = library.open_index()
    expansion = library_expansion(library)  # read once, as the service holds it
    transform = build_transform(encoder.data_config)
    draft = draft_size_for(encoder.data_config)
    client = ServiceClient(server.address)
    pid = server.proc.pid

    def bare() -> None:
        image, _ = open_image(io.BytesIO(data), draft_size=draft)
        vector = encoder.embed(torch.stack([transform(image)]))
        # the ranking `engine query` and the service use; the held-out photo has no own file
        rank_expanded(library.store, index, vector, 10, expansion, own=[()])

    def served() -> None:
        status, body = client.search(data, 10, None)
        if status != 200:
            raise SystemExit(f"search answered {status}: {body}")

    def health() -> None:
        status, _ = client.request("GET", "/api/health")
        if status != 200:
            raise SystemExit(f"health answered {status}")

    out: dict[str, list[float]] = {"served": [], "bare": [], "served_cpu": [], "bare_cpu": [], "health": []}
    for i in range(repeats + 3):
        for name, fn in (("served", served), ("bare", bare)) if i % 2 else (("bare", bare), ("served", served)):
            s0 = process_cpu_s(pid) if name == "served" else None
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            s1 = process_cpu_s(pid) if name == "served" else None
            if i >= 3:  # warm-up first
                out[name].append(t1 - t0)
                if name == "bare":
                    out["bare_cpu"].append(c1 - c0)
                elif s0 is not None and s1 is not None:
                    out["served_cpu"].append(c1 - c0 + s1 - s0)
        t0 = time.perf_counter()
        health()
        if i >= 3:
            out["health"].append(time.perf_counter() - t0)
    client.close()
    library.close()
    blas.restore_original_limits()
    return out


def cli_wall(home: Path, image: Path, runs: int, *, no_server: bool) -> list[float]:
    command = [*engine_command(), "--home", str(home), "--device", "cpu", "query", str(image), "-k", "10", "--json"]
    if no_server:
        command.append("--no-server")
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(command, env=child_env(), check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
    return walls


def throughput(server: Server, clients: int, seconds: float, kind: str, data: bytes, ids: list[int]) -> float:
    """Requests per second answered with 200 by ``clients`` concurrent keep-alive clients."""
    from engine.service.client import ServiceClient

    done = [0] * clients
    errors: list[str] = []
    stop = threading.Event()

    def loop(slot: int) -> None:
        client = ServiceClient(server.address)
        n = 0
        while not stop.is_set():
            if kind == "upload":
                status, _ = client.search(data, 10, None)
            else:
                status, _ = client.request("GET", f"/api/search?id={ids[n % len(ids)]}&k=10")
            n += 1
            if status == 200:
                done[slot] += 1
            else:
                errors.append(str(status))
        client.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} failed requests ({errors[:3]})")
    return sum(done) / (time.perf_counter() - t0)


def expansion_of(home: Path) -> str:
    """The query expansion both sides rank with: the library's setting, or $ENGINE_EXPAND's."""
    from engine.expansion import library_expansion
    from engine.library import Library

    library = Library(home)
    try:
        return library_expansion(library).describe()
    finally:
        library.close()


def run(home: Path, image: Path, repeats: int, seconds: float, cold_runs: int, workers: int | None) -> dict[str, Any]:
    from engine.service.settings import ServiceConfig

    config = ServiceConfig(workers=workers)
    data = image.read_bytes()
    out: dict[str, Any] = {"home": str(home), "image": str(image), "cores": os.cpu_count(),
                           "workers": config.inference_workers(), "torch_threads": config.torch_threads(),
                           "expansion": expansion_of(home)}
    if cold_runs:
        out["cold_in_process_s"] = [round(w, 3) for w in cli_wall(home, image, cold_runs, no_server=True)]
    server = Server(home, workers)
    try:
        timed = upload_latency(home, server, data, repeats, config.torch_threads())
        if cold_runs:
            out["through_service_s"] = [round(w, 3) for w in cli_wall(home, image, cold_runs, no_server=False)]
        if seconds > 0:
            from engine.service.client import ServiceClient

            client = ServiceClient(server.address)
            ids = [h["id"] for h in client.request("GET", "/api/search?id=1&k=50")[1]["hits"]]
            client.close()
            out["rps"] = {kind: {n: round(throughput(server, n, seconds, kind, data, ids), 1) for n in (1, 4, 8)}
                          for kind in ("id", "upload")}
    finally:
        server.stop()
    served, bare = timed["served"], timed["bare"]
    out["upload_ms"] = {"service_p50": ms(percentile(served, 50)), "service_p99": ms(percentile(served, 99)),
                        "bare_p50": ms(percentile(bare, 50)), "bare_p99": ms(percentile(bare, 99)),
                        "health_p50": ms(percentile(timed["health"], 50))}
    out["upload_ms"]["overhead_p50_pct"] = round(100 * (percentile(served, 50) / percentile(bare, 50) - 1), 1)
    if timed["served_cpu"]:
        cpu_served, cpu_bare = statistics.median(timed["served_cpu"]), statistics.median(timed["bare_cpu"])
        out["upload_cpu_ms"] = {"service_p50": ms(cpu_served), "bare_p50": ms(cpu_bare),
                                "overhead_p50_pct": round(100 * (cpu_served / cpu_bare - 1), 1)}
    if cold_runs:
        cold, warm = statistics.median(out["cold_in_process_s"]), statistics.median(out["through_service_s"])
        out["cli_speedup"] = round(cold / warm, 1)
    return out


def table(r: dict[str, Any]) -> str:
    u = r["upload_ms"]
    lines = [
        f"library: {r['home']}  query image: {Path(r['image']).name}  cores: {r['cores']}  "
        f"service: {r['workers']} inference worker(s) x {r['torch_threads']} torch thread(s)  "
        f"query expansion: {r['expansion']}",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| warm search by upload, through the service (p50 / p99) | {u['service_p50']} / {u['service_p99']} ms |",
        f"| same image, bare embed + search in-process (p50 / p99) | {u['bare_p50']} / {u['bare_p99']} ms |",
        f"| service overhead at p50 | {u['overhead_p50_pct']} % |",
    ]
    if "upload_cpu_ms" in r:
        c = r["upload_cpu_ms"]
        lines.append(f"| CPU per search, p50: through the service (its threads + this client) / bare | "
                     f"{c['service_p50']} / {c['bare_p50']} ms ({c['overhead_p50_pct']} % more) |")
    lines.append(f"| empty request (GET /api/health), p50 | {u['health_p50']} ms |")
    if "cold_in_process_s" in r:
        lines += [
            f"| `engine query IMAGE -k 10`, cold in-process (median of {len(r['cold_in_process_s'])}) | "
            f"{statistics.median(r['cold_in_process_s']):.2f} s |",
            f"| `engine query IMAGE -k 10`, through the running service | "
            f"{statistics.median(r['through_service_s']):.2f} s ({r['cli_speedup']}x faster) |",
        ]
    for kind, label in (("id", "search by id"), ("upload", "search by upload")) if "rps" in r else ():
        cells = ", ".join(f"{n} client{'s' if n > 1 else ''}: {v}" for n, v in r["rps"][kind].items())
        lines.append(f"| requests/s, {label} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", default=None, help="an existing library (default: ingest the shipped sample)")
    p.add_argument("--image", default=None, help="query image (default: a held-out sample query photo)")
    p.add_argument("--repeats", type=int, default=50, help="timed searches per latency figure")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per requests/s figure (0: none)")
    p.add_argument("--cold-runs", type=int, default=3, help="cold `engine query` runs each way (0: none)")
    p.add_argument("--workers", type=int, default=None,
                   help="the service's inference workers (default: its own choice); the bare baseline gets the "
                        "torch threads of one worker")
    p.add_argument("--expand", type=int, default=None, metavar="N",
                   help="rank with query expansion by N neighbours on both sides (0: off; default: the "
                        "library's setting); sets $ENGINE_EXPAND for the service and this process")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.expand is not None:
        os.environ["ENGINE_EXPAND"] = str(args.expand)
    image = Path(args.image) if args.image else sorted((SAMPLE / "query").glob("*.jpg"))[0]
    tmp = None
    if args.home:
        home = Path(args.home)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="engine-service-bench-"))
        home = tmp / "library"
        build_library(home)
    try:
        result = run(home, image, args.repeats, args.seconds, args.cold_runs, args.workers)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1) if args.json else table(result))


if __name__ == "__main__":
    main()
