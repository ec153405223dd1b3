"""Service latency: what `engine serve` costs and saves.

    .venv/bin/python benchmarks/service_latency.py                 # a library of the shipped sample
    .venv/bin/python benchmarks/service_latency.py --home DIR      # an existing library
    .venv/bin/python benchmarks/service_latency.py --json          # the figures as one JSON object

Prints:
  * warm search-by-upload through the service (HTTP, multipart, decode, embed, search, records),
    p50/p99, against the same work done bare in this process (decode, embed, search, records);
  * `engine query IMAGE -k 10` wall time: a cold process searching in-process (--no-server), and
    the same command answered by the running service;
  * requests per second at 1, 4 and 8 concurrent clients, for search-by-id and search-by-upload.

The query image is one the library did not index (the sample's held-out query photos), so the
upload is really decoded and embedded. Standard library and engine imports only.
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

def upload_latency(home: Path, server: Server, data: bytes, repeats: int, threads: int) -> tuple[list[float], list[float]]:
    """Seconds per search of ``data``, (through the service, bare in this process), measured in
    alternation so that both see the same machine. Bare: decode, preprocess, embed, and the
    engine's ranking (search, records, aliases) with ``threads`` torch threads (what one of the service's inference workers gets).
    Through the service: all that plus HTTP, multipart and JSON (the indexed-bytes lookup only
    when an indexed file has the upload's size: not for this held-out photo)."""
    import torch

    from engine.filters import rank_hits
    from engine.library import Library
    from engine.preprocess import build_transform, draft_size_for, open_image
    from engine.service.client import ServiceClient

    torch.set_num_threads(threads)
    library = Library(home, device="cpu")
    encoder = library.encoder()
    index = library.open_index()
    transform = build_transform(encoder.data_config)
    draft = draft_size_for(encoder.data_config)
    client = ServiceClient(server.address)

    def bare() -> None:
        image, _ = open_image(io.BytesIO(data), draft_size=draft)
        vector = encoder.embed(torch.stack([transform(image)]))
        rank_hits(library.store, index, vector, 10)  # the ranking `engine query` and the service use

    def served() -> None:
        status, body = client.search(data, 10, None)
        if status != 200:
            raise SystemExit(f"search answered {status}: {body}")

    times: dict[str, list[float]] = {"served": [], "bare": []}
    for i in range(repeats + 3):
        for name, fn in (("served", served), ("bare", bare)) if i % 2 else (("bare", bare), ("served", served)):
            t0 = time.perf_counter()
            fn()
            if i >= 3:  # warm-up first
                times[name].append(time.perf_counter() - t0)
    client.close()
    library.close()
    return times["served"], times["bare"]


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


def run(home: Path, image: Path, repeats: int, seconds: float, cold_runs: int, workers: int | None) -> dict[str, Any]:
    from engine.service.settings import ServiceConfig

    config = ServiceConfig(workers=workers)
    data = image.read_bytes()
    out: dict[str, Any] = {"home": str(home), "image": str(image), "cores": os.cpu_count(),
                           "workers": config.inference_workers(), "torch_threads": config.torch_threads()}
    out["cold_in_process_s"] = [round(w, 3) for w in cli_wall(home, image, cold_runs, no_server=True)]
    server = Server(home, workers)
    try:
        served, bare = upload_latency(home, server, data, repeats, config.torch_threads())
        out["through_service_s"] = [round(w, 3) for w in cli_wall(home, image, cold_runs, no_server=False)]
        from engine.service.client import ServiceClient

        client = ServiceClient(server.address)
        ids = [h["id"] for h in client.request("GET", "/api/search?id=1&k=50")[1]["hits"]]
        client.close()
        out["rps"] = {kind: {n: round(throughput(server, n, seconds, kind, data, ids), 1) for n in (1, 4, 8)}
                      for kind in ("id", "upload")}
    finally:
        server.stop()
    out["upload_ms"] = {"service_p50": ms(percentile(served, 50)), "service_p99": ms(percentile(served, 99)),
                        "bare_p50": ms(percentile(bare, 50)), "bare_p99": ms(percentile(bare, 99))}
    out["upload_ms"]["overhead_p50_pct"] = round(100 * (percentile(served, 50) / percentile(bare, 50) - 1), 1)
    cold, warm = statistics.median(out["cold_in_process_s"]), statistics.median(out["through_service_s"])
    out["cli_speedup"] = round(cold / warm, 1)
    return out


def table(r: dict[str, Any]) -> str:
    u = r["upload_ms"]
    lines = [
        f"library: {r['home']}  query image: {Path(r['image']).name}  cores: {r['cores']}  "
        f"service: {r['workers']} inference worker(s) x {r['torch_threads']} torch thread(s)",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| warm search by upload, through the service (p50 / p99) | {u['service_p50']} / {u['service_p99']} ms |",
        f"| same image, bare embed + search in-process (p50 / p99) | {u['bare_p50']} / {u['bare_p99']} ms |",
        f"| service overhead at p50 | {u['overhead_p50_pct']} % |",
        f"| `engine query IMAGE -k 10`, cold in-process (median of {len(r['cold_in_process_s'])}) | "
        f"{statistics.median(r['cold_in_process_s']):.2f} s |",
        f"| `engine query IMAGE -k 10`, through the running service | "
        f"{statistics.median(r['through_service_s']):.2f} s ({r['cli_speedup']}x faster) |",
    ]
    for kind, label in (("id", "search by id"), ("upload", "search by upload")):
        cells = ", ".join(f"{n} client{'s' if n > 1 else ''}: {v}" for n, v in r["rps"][kind].items())
        lines.append(f"| requests/s, {label} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", default=None, help="an existing library (default: ingest the shipped sample)")
    p.add_argument("--image", default=None, help="query image (default: a held-out sample query photo)")
    p.add_argument("--repeats", type=int, default=50, help="timed searches per latency figure")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per requests/s figure")
    p.add_argument("--cold-runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=None,
                   help="the service's inference workers (default: its own choice); the bare baseline gets the "
                        "torch threads of one worker")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
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
