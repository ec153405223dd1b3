"""The package layering, checked on the source rather than trusted.

    db      imports nothing of ours (engine, ingest, train, bench)
    engine  imports db, never ingest, train or bench -- except engine/cli.py and its command modules
            engine/cli_*.py (and engine/__main__.py), the command line, which reaches up into every
            package (lazily, inside its commands)
    ingest  and train are peers: neither imports the other; they import engine and db
    bench   (the benchmarks) may import anything; nothing of the product imports it but the CLI

Every import statement counts: module level, function-local, and those under ``if TYPE_CHECKING:``
(a type that crosses the rule is a dependency all the same, and none is needed).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "ingest", "train", "db")
OURS = {"engine", "ingest", "train", "db", "bench", "benchmarks"}
CLI_FILES = {"engine/__main__.py"} | {p.relative_to(ROOT).as_posix() for p in (ROOT / "engine").glob("cli*.py")}

# package -> top-level packages of ours it must not import
FORBIDDEN = {
    "db": {"engine", "ingest", "train", "bench", "benchmarks"},
    "engine": {"ingest", "train", "bench", "benchmarks"},
    "ingest": {"train", "bench", "benchmarks"},
    "train": {"ingest", "bench", "benchmarks"},
}


def imported_packages(source: str, module: str) -> set[str]:
    """Top-level packages of ours named by any import in ``source`` (the text of ``module``,
    e.g. "engine.query"; relative imports are resolved against it)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        found.update(top for top in (name.split(".")[0] for name in names) if top in OURS)
    return found


def _modules() -> dict[str, tuple[str, str]]:
    """relative path -> (dotted module name, source) for every .py file of the checked packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            dotted = rel[:-3].replace("/", ".")  # "engine.__init__": relative imports resolve inside engine
            out[rel] = (dotted, path.read_text(encoding="utf-8"))
    return out


MODULES = _modules()


def test_the_checker_sees_local_type_checking_and_relative_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "if TYPE_CHECKING:\n    from train.loop import TrainConfig\n"
        "def f():\n    import ingest.pipeline\n"
        "from . import library\n"
        "from ..db import store\n"
    )
    assert imported_packages(source, "engine.sub.mod") == {"train", "ingest", "engine"}
    assert imported_packages("from .models import Base\n", "db.store") == {"db"}
    modules = MODULES
    assert {"engine/cli.py", "engine/query.py", "db/store.py", "ingest/pipeline.py", "train/loop.py"} <= set(modules)
    # The CLI reaches up through function-local imports; the walk must see them.
    assert "ingest" in imported_packages(modules["engine/cli.py"][1], "engine.cli")
    assert "train" in imported_packages(modules["engine/cli_train.py"][1], "engine.cli_train")
    assert {"engine/cli.py", "engine/cli_train.py", "engine/cli_serve.py"} <= CLI_FILES


@pytest.mark.parametrize("rel", sorted(MODULES))
def test_imports_follow_the_layering(rel):
    dotted, source = MODULES[rel]
    if rel in CLI_FILES:
        return  # the command line may reach every package
    package = rel.split("/")[0]
    crossing = imported_packages(source, dotted) & FORBIDDEN[package]
    assert not crossing, f"{rel} imports {sorted(crossing)}: {package}/ must not depend on them"


def test_cli_import_and_help_stay_light():
    """``engine --help`` must be instant: importing the CLI and printing help loads no torch, timm,
    faiss, sqlalchemy or matplotlib."""
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from engine.cli import main\n"
            "heavy = ('torch', 'timm', 'faiss', 'sqlalchemy', 'matplotlib')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
            "result = CliRunner().invoke(main, ['--help'])\n"
            "assert result.exit_code == 0 and 'ingest' in result.output, result.output\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["[]", "[]"]
