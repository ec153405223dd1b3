"""Cold start of `engine query` without a service: the timm-free eval transform, the TorchScript copy
of the library's encoder (equal to the eager one, never trusted unless its record matches), and what
a query imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.library import Library
from engine.preprocess import EvalTransform, build_transform, load_image
from engine.query import search_library
from engine.scripted import MAX_BATCH, RECORD_KEY, SCRIPT_NAME, ScriptedEncoder
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_folder, make_image

CONFIGS = [
    {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
     "crop_pct": 0.875},
    {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
     "std": (0.229, 0.224, 0.225), "crop_pct": 0.95, "crop_mode": "center"},
    {"input_size": (3, 40, 40), "interpolation": "nearest", "mean": (0.485, 0.456, 0.406),
     "std": (0.229, 0.224, 0.225), "crop_pct": 1.2},  # scale below the crop: zero padding
    {"input_size": (3, 48, 48), "interpolation": "lanczos", "mean": (0.1, 0.2, 0.3), "std": (0.3, 0.2, 0.1)},
]
SIZES = [(1, 1), (7, 300), (300, 7), (255, 256), (256, 255), (224, 224), (257, 257), (640, 480), (33, 31), (27, 27)]


def _modes_images(tmp_path: Path) -> list[Image.Image]:
    """RGB images decoded by the engine from files of several modes, sizes and aspect ratios."""
    rng = np.random.default_rng(7)
    out = []
    for i, (w, h) in enumerate(SIZES):
        arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        mode = ("RGB", "L", "RGBA", "P", "CMYK")[i % 5]
        img = Image.fromarray(arr[..., :3]) if mode != "RGBA" else Image.fromarray(arr, "RGBA")
        img = img.convert(mode) if mode not in ("RGB", "RGBA") else img
        path = tmp_path / f"m{i}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(path)
        out.append(load_image(path))
    return out


@pytest.mark.parametrize("cfg", CONFIGS)
def test_eval_transform_equals_timm_bit_for_bit(cfg, tmp_path):
    from timm.data import create_transform

    fast = build_transform(cfg)
    assert isinstance(fast, EvalTransform)
    ref = create_transform(**cfg, is_training=False)
    for img in _modes_images(tmp_path):
        a, b = fast(img), ref(img)
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        assert torch.equal(a, b), (img.size, float((a - b).abs().max()))


def test_other_transforms_stay_timms():
    base = dict(CONFIGS[1])
    assert not isinstance(build_transform(base, train=True), EvalTransform)
    for change in ({"crop_mode": "squash"}, {"crop_mode": "border"}, {"input_size": (3, 32, 48)},
                   {"interpolation": "random"}):
        assert EvalTransform.for_config({**base, **change}) is None


def test_max_batch_follows_folding():
    from engine.folding import FOLD_MIN_BATCH

    assert MAX_BATCH == FOLD_MIN_BATCH - 1


@pytest.fixture()
def library(tmp_path, tiny_model):
    photos = make_folder(tmp_path / "photos", 5)
    lib = Library(tmp_path / "home", device="cpu")
    report = ingest_paths(lib, [tmp_path / "photos"], IngestConfig(batch_size=8, workers=0), model=tiny_model)
    assert report.embedded == 5
    queries = [make_image(tmp_path / "q" / f"q{i}.png", 100 + i, size=(50, 37)) for i in range(3)]
    yield lib, photos, queries
    lib.close()


def _fresh(lib: Library) -> Library:
    return Library(lib.paths.home, device="cpu")


def test_scripted_copy_written_with_the_library_and_equal_to_eager(library):
    lib, _, queries = library
    record = lib.store.get_meta(RECORD_KEY)
    assert (lib.paths.home / SCRIPT_NAME).is_file() and record["identity"] == lib.model_info().identity
    fresh = _fresh(lib)
    fast = fresh.query_encoder(1)
    assert isinstance(fast, ScriptedEncoder) and fresh._encoder is None  # nothing of the eager model built
    eager = lib.encoder()
    assert fast.data_config == eager.data_config and fast.dim == eager.dim
    from engine.embedding import embed_files

    for batch in (queries[:1], queries):
        a = embed_files(fast, batch, workers=0).embeddings
        b = embed_files(eager, batch, workers=0).embeddings
        assert np.array_equal(a, b)
    x = torch.randn(2, *eager.data_config["input_size"], generator=torch.Generator().manual_seed(3))
    assert float(np.abs(fast.embed(x) - eager.embed(x)).max()) < 1e-5
    assert fresh.query_encoder(MAX_BATCH + 1) is not fast and not isinstance(fresh.query_encoder(MAX_BATCH + 1),
                                                                            ScriptedEncoder)
    fresh.close()


def test_a_copy_another_user_made_is_never_loaded(library, monkeypatch, tmp_path):
    """A library folder shared from elsewhere carries its encoder.ts and a record signed with the
    other user's key: the record names the right identity and hashes, but it is not loaded (only
    tensors are read from files this engine did not make); the eager encoder answers."""
    lib, _, _ = library
    loads = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "someone-else"))
    fresh = Library(lib.paths.home, device="cpu", read_only=True)  # read-only: nothing is rewritten
    assert not isinstance(fresh.query_encoder(1), ScriptedEncoder) and loads == []
    fresh.close()


def _results(lib: Library, paths) -> list[dict]:
    return [r.to_dict() for r in search_library(lib, [str(p) for p in paths], 5)]


def test_query_results_identical_with_and_without_the_copy(library):
    lib, photos, queries = library
    fresh = _fresh(lib)
    with_copy = [_results(fresh, [q]) for q in queries]
    assert isinstance(fresh.query_encoder(1), ScriptedEncoder)
    fresh.close()
    (lib.paths.home / SCRIPT_NAME).unlink()
    eager = _fresh(lib)
    eager.store.set_meta(RECORD_KEY, None)
    without = [_results(eager, [q]) for q in queries]
    assert eager._encoder is not None  # the eager encoder answered
    eager.close()
    assert with_copy == without
    assert (lib.paths.home / SCRIPT_NAME).is_file()  # and the missing copy was written again


def _watch_loads(monkeypatch) -> list[bytes]:
    """Every byte string handed to torch.jit.load from now on."""
    seen: list[bytes] = []
    original = torch.jit.load

    def load(source, *args, **kwargs):
        seen.append(source.getvalue() if hasattr(source, "getvalue") else Path(source).read_bytes())
        return original(source, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", load)
    return seen


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "replace", "stale-identity", "other-torch", "no-record"])
def test_tampered_or_stale_copy_is_ignored_and_rewritten(library, monkeypatch, damage):
    lib, _, _ = library
    path = lib.paths.home / SCRIPT_NAME
    record = lib.store.get_meta(RECORD_KEY)
    data = path.read_bytes()
    if damage == "flip-byte":
        path.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    elif damage == "truncate":
        path.write_bytes(data[:-10])
    elif damage == "replace":  # other bytes of the same size
        path.write_bytes(data[::-1])
    elif damage == "stale-identity":
        lib.store.set_meta(RECORD_KEY, dict(record, identity="0" * 16))
    elif damage == "other-torch":
        lib.store.set_meta(RECORD_KEY, dict(record, torch="0.0"))
    else:
        lib.store.set_meta(RECORD_KEY, None)
    on_disk = path.read_bytes()
    fresh = _fresh(lib)
    with monkeypatch.context() as m:
        loaded = _watch_loads(m)
        enc = fresh.query_encoder(1)
    assert not isinstance(enc, ScriptedEncoder) and enc is fresh.encoder()
    # the copy found was never handed to torch.jit.load (only the one just written, to check it)
    assert len(loaded) == 1 and loaded[0] == path.read_bytes()
    if damage in ("flip-byte", "truncate", "replace"):
        assert on_disk not in loaded
    fresh.close()
    again = _fresh(lib)
    assert isinstance(again.query_encoder(1), ScriptedEncoder)  # written again, and trusted again
    again.close()


def test_read_only_library_never_writes_the_copy(library, monkeypatch):
    lib, _, queries = library
    (lib.paths.home / SCRIPT_NAME).unlink()
    lib.store.set_meta(RECORD_KEY, None)
    ro = Library(lib.paths.home, device="cpu", read_only=True)
    assert _results(ro, queries[:1])[0]["hits"]
    ro.close()
    assert not (lib.paths.home / SCRIPT_NAME).exists()


def _imported_by(library_home: Path, env: dict, *args: str) -> tuple[list[str], str]:
    """(which of torch, timm, torchvision, torch._dynamo the CLI imported, its stdout)."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('IMPORTED', [m for m in ('torch', 'timm', 'torchvision', 'torch._dynamo')"
            " if m in sys.modules], file=sys.stderr))\n"
            "from engine.cli import main\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code, "--home", str(library_home), "--device", "cpu", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("IMPORTED")][-1]
    return eval(line.split(" ", 1)[1]), proc.stdout  # a list literal printed by the child


def test_cold_query_imports_no_timm_and_indexed_query_no_torch(library, subprocess_env):
    lib, photos, queries = library
    for image, want in ((photos[0], []), (queries[0], ["torch"])):
        imported, out = _imported_by(lib.paths.home, subprocess_env, "query", str(image), "-k", "3", "--json",
                                     "--no-server")
        assert imported == want and json.loads(out.splitlines()[0])["hits"]
    imported, out = _imported_by(lib.paths.home, subprocess_env, "compare", str(queries[0]), str(queries[1]),
                                 "--json", "--no-server")
    assert imported == ["torch"] and json.loads(out)["verdict"]


def test_compare_and_label_identical_with_and_without_the_copy(library, monkeypatch):
    import engine.scripted

    from click.testing import CliRunner

    from engine.cli import main

    lib, photos, queries = library
    args = [["compare", str(queries[0]), str(queries[1]), "--json", "--no-server"],
            ["query", str(queries[2]), "--label", "-k", "3", "--json", "--no-server"]]

    def run_all() -> list[str]:
        outs = []
        for a in args:
            r = CliRunner().invoke(main, ["--home", str(lib.paths.home), "--device", "cpu", *a])
            assert r.exit_code == 0, r.output
            outs.append(r.output)
        return outs

    used: list[object] = []
    real_load = engine.scripted.load_scripted_copy
    monkeypatch.setattr(engine.scripted, "load_scripted_copy", lambda *a: used.append(real_load(*a)) or used[-1])
    fast = run_all()
    assert len(used) == 2 and all(isinstance(u, ScriptedEncoder) for u in used)
    monkeypatch.setattr(engine.scripted, "load_scripted_copy", lambda *a: None)  # the eager encoder answers
    monkeypatch.setattr(Library, "save_scripted_copy", lambda self, enc: False)
    assert run_all() == fast


def test_replaced_encoder_file_is_still_refused_with_a_copy(library, tmp_path):
    from engine.errors import ModelMismatchError
    from tests.util import tiny_checkpoint

    lib, _, queries = library
    tiny_checkpoint(lib.paths.encoder, backbone="test_efficientnet")  # another model in encoder.pt
    fresh = _fresh(lib)
    with pytest.raises(ModelMismatchError):
        fresh.query_encoder(1)  # the copy is tied to the encoder.pt it was written beside
    fresh.close()
