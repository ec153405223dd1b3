"""Shared bits of the benchmark scripts: argument helpers and output (text via
``bench.report.format_bench``, or ``--json``), so every figure is computed in one place."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from bench.machine import machine_info
from bench.report import format_bench


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--out", help="also write the JSON here")
    return p


def emit(args: argparse.Namespace, sections: dict[str, Any], extra_text: str = "") -> None:
    """Print ``sections`` (named as in ``run_bench`` results) with the machine they ran on."""
    results = {"machine": machine_info(), **sections}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    if args.json:
        json.dump(results, sys.stdout, indent=2, default=str)
        print()
    else:
        print(format_bench(results))
        if extra_text:
            print(extra_text)


def run_and_report(args: argparse.Namespace, run: Callable[[], dict[str, Any]],
                   format_text: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Run a long benchmark and print its results with the machine they ran on, its load average
    taken before and after (``loadavg_end``: a long run is judged by both): as one JSON object with
    ``--json``, else a line about the machine, then ``format_text(results)``; also written to
    ``--out`` when given. Returns the results."""
    machine = machine_info()
    results = {"machine": machine, **run()}
    machine["loadavg_end"] = machine_info()["loadavg"]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    if getattr(args, "json", False):
        json.dump(results, sys.stdout, indent=2, default=str)
        print()
    else:
        print(f"machine: {machine['cpu']}, {machine['usable_cores']} cores, {machine['ram_gb']} GB RAM; faiss "
              f"{machine.get('faiss')}; load average {machine['loadavg']} -> {machine['loadavg_end']}")
        print(format_text(results))
    return results
