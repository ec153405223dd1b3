"""Shared bits of the benchmark scripts: argument helpers and output (text via
``bench.report.format_bench``, or ``--json``), so every figure is computed in one place."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

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
