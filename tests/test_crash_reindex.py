"""Fault injection for `engine reindex`: a real subprocess is killed with SIGKILL at each moment that
matters (engine.faults: after a staged batch, inside a commit, before the switch, inside the
switch's commit, after the switch before the encoder file is renamed, after the rename, during the
index save; for --index-type: after the build, during and after the save, before the type is
stored).

Until the switch every query answers exactly as before the reindex began (same ids, same
distances, the old encoder for an image from outside); after it, with the new encoder. Rerunning
finishes the job: every row kept, each vector a fresh embedding by the new encoder."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from click.testing import CliRunner

from engine.cli import main
from engine.library import Library
from ingest.doctor import check_library
from tests.reindex_util import answers, assert_converged, assert_same_answers, assert_self_found, live_state
from tests.util import make_image, tiny_checkpoint


def _killed(cmd: list[str], env: dict[str, str], fault: str) -> None:
    proc = subprocess.run(cmd, env=dict(env, ENGINE_FAULT=fault), capture_output=True, text=True, timeout=180)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == -signal.SIGKILL, f"{fault} did not kill the run (exit {proc.returncode}): {proc.stderr}"


def _rerun(home: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", "reindex", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _doctor_ok(home: Path) -> list[str]:
    """Doctor finds no problem (notes allowed); returns the codes of its findings."""
    lib = Library(home, device="cpu")
    try:
        report = check_library(lib)
        assert report.ok, report.lines()
        return [f.code for f in report.findings]
    finally:
        lib.close()


def test_reindex_model_killed_at_any_point_answers_as_before_then_converges(tmp_path, tiny_model, engine_command,
                                                                            subprocess_env):
    photos = [make_image(tmp_path / "photos" / f"img_{i:02d}.png", seed=300 + i, size=(24, 24)) for i in range(9)]
    outside = make_image(tmp_path / "outside.png", seed=999, size=(24, 24))
    small = str(tiny_checkpoint(tmp_path / "small.pt", head_dim=32))  # 96-d -> 32-d: a change of dimension
    home = tmp_path / "home"
    base = [*engine_command, "--home", str(home), "--device", "cpu", "reindex", "--batch-size", "2", "--workers", "0"]
    to_small, to_tiny = [*base, "--model", small], [*base, "--model", tiny_model]
    result = CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", "ingest", str(tmp_path / "photos"),
                                       "--model", tiny_model, "--workers", "0"])
    assert result.exit_code == 0, result.output
    queries = [*photos, outside]
    original, state = answers(home, queries), live_state(home)
    ids = state["ids"]

    # before the switch: after 2 staged batches, inside the commit of a batch, with all staged, inside the switch
    for fault, staged in [("reindex-staged:2", 4), ("commit:2", 6), ("reindex-before-switch:1", 9), ("commit:1", 9)]:
        _killed(to_small, subprocess_env, fault)
        assert live_state(home) == state, fault  # rows, vectors, model, generation, encoder and index files
        assert_same_answers(answers(home, queries), original, exact=True)
        lib = Library(home, device="cpu")
        assert len(lib.store.pending_ids()) == staged, fault
        lib.close()
        assert "reindex-pending" in _doctor_ok(home)

    # after the switch, before encoder.pending.pt is renamed: the new encoder and vectors answer
    _killed(to_small, subprocess_env, "reindex-switched:1")
    switched = answers(home, queries)
    assert_self_found(switched, photos)
    assert sorted(switched[0][1]) == ids
    _rerun(home, "--model", small, "--workers", "0")
    assert_converged(home, small, ids)
    assert_same_answers(answers(home, queries), switched)

    # back to the first encoder: killed after the rename, before the index is rebuilt; answers are
    # those of the first encoder again (vectors embedded in other batches: equal to the last bits)
    _killed(to_tiny, subprocess_env, "reindex-encoder-moved:1")
    assert_same_answers(answers(home, queries), original)
    _rerun(home, "--model", tiny_model, "--workers", "0")
    assert_converged(home, tiny_model, ids)

    # and again, killed inside the index save (its record written, the new file not yet in place)
    _killed(to_small, subprocess_env, "index-state-written:1")
    assert_same_answers(answers(home, queries), switched)
    _doctor_ok(home)
    _rerun(home, "--model", small, "--workers", "0")
    assert_converged(home, small, ids)
    assert_same_answers(answers(home, queries), switched)


def test_reindex_index_type_killed_at_any_point_leaves_a_working_library(tmp_path, tiny_model, engine_command,
                                                                         subprocess_env):
    photos = [make_image(tmp_path / "photos" / f"img_{i:02d}.png", seed=400 + i, size=(24, 24)) for i in range(8)]
    outside = make_image(tmp_path / "outside.png", seed=998, size=(24, 24))
    home = tmp_path / "home"
    result = CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", "ingest", str(tmp_path / "photos"),
                                       "--model", tiny_model, "--workers", "0"])
    assert result.exit_code == 0, result.output
    queries = [*photos, outside]
    original, ids = answers(home, queries), live_state(home)["ids"]
    cmd = [*engine_command, "--home", str(home), "--device", "cpu", "reindex", "--index-type", "HNSW32"]
    for fault in ("reindex-index-built:1", "index-state-written:1", "index-replaced:1", "reindex-index-saved:1"):
        _killed(cmd, subprocess_env, fault)
        # the old index or the new one (HNSW32 on 9 vectors finds every one): same answers
        assert_same_answers(answers(home, queries), original)
        _doctor_ok(home)
    _rerun(home, "--index-type", "HNSW32")
    assert_converged(home, tiny_model, ids, factory="HNSW32")
    assert_same_answers(answers(home, queries), original)
