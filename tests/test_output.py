"""Output that stays parseable and safe (issue 9, item 12): every format keeps one record per record,
JSON is strict UTF-8 (no lone surrogates, no NaN), and text is terminal-safe whatever the file
names hold: newline, tab, escape sequences, bidi overrides, bytes that are not UTF-8."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.output import display_path, json_text, printable, to_json, to_json_bytes
from tests.util import make_image

# Names a hostile folder can hold (Linux: any byte but "/" and NUL).
GOOD_NAMES = ["new\nline.png", "tab\there.png", "esc\x1b[31mred\x1b[0m.png", "title\x1b]0;pwned\x07.png",
              os.fsdecode(b"latin1 caf\xe9 \xff.png"), "rtl\u202egnp.png", "nel\x85sep\u2028x.png",
              "plain caf\u00e9.png"]
BAD_NAMES = ["broken\nfile.png", os.fsdecode(b"broken \xfe.png"), "broken\x1b[2J\tclear.png"]
RAW_UNSAFE = [b"\x1b", b"\x07", b"\t" + b"here", b"\xe2\x80\xae", b"\xc2\x85", b"\xe2\x80\xa8"]


def _strict_records(data: bytes) -> list:
    """Parse JSON lines as a strict consumer would: UTF-8 decoded strictly, one object per line,
    and no string holding a lone surrogate (json.loads itself accepts \\udcff escapes)."""
    text = data.decode("utf-8", "strict")
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
               for line in text.split("\n") if line]

    def walk(obj) -> None:
        if isinstance(obj, str):
            obj.encode("utf-8", "strict")  # raises on a lone surrogate
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(k)
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for record in records:
        walk(record)
    return records


def test_printable_escapes_every_control_and_keeps_text():
    assert printable("caf\u00e9 \u65e5\u672c.png") == "caf\u00e9 \u65e5\u672c.png"
    assert printable("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert printable("x\x1b[31my\x07\x7f\x9b") == "x\\x1b[31my\\x07\\x7f\\x9b"
    assert printable("a\u202eb\u2028c\u2029d\x85") == "a\\u202eb\\u2028c\\u2029d\\x85"
    assert printable(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert printable("back\\slash") == "back\\\\slash"  # doubled, so every escape reads back unambiguously
    for name in GOOD_NAMES + BAD_NAMES:
        shown = printable(name)
        assert len(shown.splitlines()) == 1 and shown.isprintable(), repr(shown)
        shown.encode("utf-8", "strict")
    assert display_path(b"/tmp/\xff\n.png") == "/tmp/\\xff\\n.png"


def test_to_json_is_strict_utf8_one_line():
    obj = {"path": os.fsdecode(b"/p/\xff\xfe.png"), "name": "a\nb\x1b\u2028\u202e\x85", "nan": float("nan"),
           "inf": float("inf"), "list": (1, 2.5), "when": Path("/x")}
    text = to_json(obj)
    assert "\n" not in text and "\u2028" not in text and "\x85" not in text and "\x1b" not in text
    back = _strict_records(to_json_bytes(obj))[0]
    assert back["path"] == "/p/\\xff\\xfe.png"  # undecodable bytes as the text \xNN
    assert back["name"] == "a\nb\x1b\u2028\u202e\x85"  # valid text round-trips exactly
    assert back["nan"] is None and back["inf"] is None and back["list"] == [1, 2.5] and back["when"] == "/x"
    assert json_text("ok caf\u00e9") == "ok caf\u00e9"


@pytest.fixture()
def hostile_folder(tmp_path) -> Path:
    root = tmp_path / "hostile"
    root.mkdir()
    for i, name in enumerate(GOOD_NAMES):
        make_image(root / name, seed=100 + i)
    for name in BAD_NAMES:
        (root / name).write_bytes(b"not an image at all")
    return root


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, env=env, timeout=120)


def test_hostile_names_through_ingest_and_query(hostile_folder, tmp_path, tiny_model, engine_command, subprocess_env):
    home = str(tmp_path / "home")
    base = [*engine_command, "--home", home, "--device", "cpu"]
    n_good, n_bad = len(GOOD_NAMES), len(BAD_NAMES)

    r = _run([*base, "ingest", str(hostile_folder), "--model", tiny_model, "--workers", "0", "--json"], subprocess_env)
    assert r.returncode == 0, r.stderr
    (summary,) = _strict_records(r.stdout)  # exactly one record
    assert summary["added"] + summary["duplicates"] == n_good and summary["failed"] == n_bad
    reported = {f["path"] for f in summary["failures"]}
    assert reported == {json_text(str(hostile_folder / name)) for name in BAD_NAMES}

    # the failures report: a header, then one line per failure, each exactly path<TAB>reason
    report = Path(home, "ingest-failures.tsv").read_bytes().decode("utf-8", "strict")
    lines = report.split("\n")
    assert lines[-1] == "" and lines[0] == "path\treason" and len(lines) == 2 + n_bad
    assert all(line.count("\t") == 1 and all(f.isprintable() for f in line.split("\t")) for line in lines[1:-1])
    assert {line.split("\t")[0] for line in lines[1:-1]} == {display_path(hostile_folder / n) for n in BAD_NAMES}

    r = _run([*base, "ingest", str(hostile_folder), "--workers", "0"], subprocess_env)  # text: the same failures
    assert r.returncode == 0
    out, err = r.stdout.decode("utf-8", "strict"), r.stderr.decode("utf-8", "strict")
    assert len(out.splitlines()) == 1
    failed_lines = [line for line in err.splitlines() if line.startswith("  failed: ")]
    assert len(failed_lines) == n_bad
    for raw in RAW_UNSAFE:
        assert raw not in r.stdout and raw not in r.stderr, raw

    k = 3
    r = _run([*base, "query", str(hostile_folder), "-k", str(k), "--json", "--no-server"], subprocess_env)
    records = _strict_records(r.stdout)
    assert len(records) == n_good + n_bad  # one object per query image, failures included
    assert sum(1 for rec in records if rec.get("error")) == n_bad
    assert all(len(rec["hits"]) == k for rec in records if not rec.get("error"))
    queried = {rec["query"] for rec in records}
    assert queried == {json_text(str(hostile_folder / n)) for n in GOOD_NAMES + BAD_NAMES}

    r = _run([*base, "query", str(hostile_folder), "-k", str(k), "--no-server"], subprocess_env)
    out, err = r.stdout.decode("utf-8", "strict"), r.stderr.decode("utf-8", "strict")
    assert len(out.splitlines()) == n_good * (2 + k)  # "query:", the header, k hits
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == n_bad
    for raw in RAW_UNSAFE:
        assert raw not in r.stdout and raw not in r.stderr, raw
    assert "esc\\x1b[31mred\\x1b[0m.png" in out and "latin1 caf\\xe9 \\xff.png" in out

    r = _run([*base, "info", "--json"], subprocess_env)
    assert r.returncode == 0 and len(_strict_records(r.stdout)) == 1


def test_hostile_home_path_in_messages(tmp_path, engine_command, subprocess_env):
    """An error naming a hostile path is one visible line on stderr."""
    home = tmp_path / "home\x1b[2J\nnext"
    r = _run([*engine_command, "--home", str(home), "query", str(tmp_path / "none\x1b[31m.png"), "--no-server"],
             subprocess_env)
    assert r.returncode == 1
    err = r.stderr.decode("utf-8", "strict")
    assert len(err.splitlines()) == 1 and "\x1b" not in err and "\\x1b[2J\\nnext" in err


def test_library_api_paths_with_newlines_round_trip(tmp_path, tiny_model):
    """The library itself keeps names as they are (only output escapes them)."""
    from engine.library import Library
    from engine.query import search_library
    from ingest.pipeline import IngestConfig, ingest_paths

    root = tmp_path / "p"
    name = root / "a\nb\x1b.png"
    make_image(name, 1)
    shutil.copy(name, root / "plain.png")
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [root], IngestConfig(workers=0), model=tiny_model)
    (result,) = search_library(lib, [name], k=2)
    assert {h.path for h in result.hits} <= {str(name), str(root / "plain.png")}
    assert json.loads(to_json(result.to_dict()))["query"] == str(name)


def test_service_answers_strict_json_for_hostile_names(tmp_path, tiny_model):
    """The service's JSON follows the same rules (a non-UTF-8 name was a serialisation error)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from engine.library import Library
    from engine.service.app import create_app
    from engine.service.settings import ServiceConfig
    from ingest.pipeline import IngestConfig, ingest_paths

    root = tmp_path / "p"
    make_image(root / GOOD_NAMES[4], 1)  # latin-1 bytes
    make_image(root / GOOD_NAMES[2], 2)  # escape sequences
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [root], IngestConfig(workers=0), model=tiny_model)
    app = create_app(lib, ServiceConfig(poll_s=0, allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        upload = (root / GOOD_NAMES[2]).read_bytes()
        r = client.post("/api/search?k=2", files={"image": ("q.png", upload, "image/png")})
        assert r.status_code == 200
        (body,) = _strict_records(r.content)
        assert {h["path"] for h in body["hits"]} == {json_text(str(root / n)) for n in (GOOD_NAMES[2], GOOD_NAMES[4])}
        for hit in body["hits"]:
            r = client.get(f"/api/images/{hit['id']}")
            assert r.status_code == 200 and _strict_records(r.content)[0]["path"] == hit["path"]
        r = client.get("/api/info")
        assert r.status_code == 200 and len(_strict_records(r.content)) == 1
