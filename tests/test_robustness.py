"""Odd and broken inputs, each one in a messy folder ingested once: odd-but-valid files are indexed
correctly, broken ones are skipped with a reason in the summary and the report file, and nothing
ever raises or prints a traceback. Also the exit codes of `engine ingest` and removal."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from engine.embedding import embed_files
from engine.library import Library
from engine.output import json_text
from engine.preprocess import open_image
from engine.query import search_library
from ingest.pipeline import IngestConfig, ingest_paths
from tests.util import make_image

CFG = IngestConfig(batch_size=4, workers=0)
NON_UTF8 = os.fsdecode(b"caf\xe9 \xff photo.png")  # latin-1 bytes: not valid UTF-8


def _scene(seed: int, size=(48, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.empty((h, w, 3), np.float64)
    arr[:] = rng.integers(0, 256, 3)
    arr += np.linspace(0, 1, w)[None, :, None] * rng.integers(-120, 120, 3)
    for _ in range(3):  # three seeded blocks of colour
        x0, y0 = rng.integers(0, max(1, w // 2)), rng.integers(0, max(1, h // 2))
        arr[y0:y0 + rng.integers(1, max(2, h // 2)), x0:x0 + rng.integers(1, max(2, w // 2))] = rng.integers(0, 256, 3)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _jpeg_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _bomb_png(side: int = 20000) -> bytes:
    """A real decompression bomb: a valid 1-bit PNG of side x side pixels (400 M for 20000, over twice
    Pillow's limit) that is about 50 KB on disk."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def build_odd(folder: Path) -> dict[str, Path]:
    """Odd but valid files; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        out[name] = folder / name
        out[name].write_bytes(data)

    put("one_pixel.png", _png_bytes(Image.new("RGB", (1, 1), (200, 30, 30))))
    put("wide_strip.png", _png_bytes(Image.fromarray(_scene(1, (2400, 3)))))
    put("tall_strip.jpg", _jpeg_bytes(_scene(2, (4, 1800))))
    cmyk = Image.fromarray(_scene(3)).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    put("cmyk.jpg", buf.getvalue())
    gray16 = (np.linspace(0, 65535, 48 * 32).reshape(32, 48)).astype(np.uint16)
    put("gray16.png", _png_bytes(Image.fromarray(gray16)))
    pal = np.zeros((32, 48), np.uint8)
    pal[:, 24:] = 1
    palette = Image.fromarray(pal, "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    put("palette_alpha.png", _png_bytes(palette, transparency=0))
    frames = [Image.fromarray(_scene(10 + i)).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("animated.gif", buf.getvalue())
    put("jpeg_named.png", _jpeg_bytes(_scene(4)))
    exif = Image.Exif()
    exif[0x0112] = 6  # display after rotating 90 degrees clockwise
    put("exif_rotated.jpg", _jpeg_bytes(np.rot90(_scene(5)).copy(), exif=exif.tobytes()))
    put("фото 写真 ü.png", _png_bytes(Image.fromarray(_scene(6))))
    put("name with  spaces.png", _png_bytes(Image.fromarray(_scene(7))))
    try:
        put(NON_UTF8, _png_bytes(Image.fromarray(_scene(8))))
    except (OSError, UnicodeEncodeError):  # a file system that only takes UTF-8 names (macOS)
        out.pop(NON_UTF8, None)
    inner = folder / "album.png"  # a folder named like an image: walked, never decoded
    inner.mkdir()
    put("album.png/inside.png", _png_bytes(Image.fromarray(_scene(9))))
    (folder / "empty_folder.jpg").mkdir()
    return out


# name -> a phrase the failure reason must contain
BROKEN_REASONS = {
    "zero_bytes.jpg": "empty file",
    "truncated.jpg": "truncated",
    "truncated.png": "cannot decode",
    "random_bytes.jpg": "not an image",
    "text.png": "not an image",
    "page.jpg": "not an image",
    "bomb.png": "decompression bomb",
    "unreadable.jpg": "permission denied",
    "fifo.jpg": "not a regular file",
    "loop_a.jpg": "symbolic links",
    "dangling.jpg": "no such file",
}


def build_broken(folder: Path, monkeypatch) -> dict[str, Path]:
    """Broken files, plus a symlink loop of folders that must be walked once; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {name: folder / name for name in BROKEN_REASONS}
    out["zero_bytes.jpg"].write_bytes(b"")
    jpeg = _jpeg_bytes((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    out["truncated.jpg"].write_bytes(jpeg[: len(jpeg) * 6 // 10])
    png = _png_bytes(Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)))
    out["truncated.png"].write_bytes(png[: len(png) * 6 // 10])
    out["random_bytes.jpg"].write_bytes(np.random.default_rng(2).bytes(3000))
    out["text.png"].write_text("these are my holiday notes, not a picture\n")
    out["page.jpg"].write_text("<!doctype html><html><body><img src='x.jpg'></body></html>\n")
    out["bomb.png"].write_bytes(_bomb_png())
    out["unreadable.jpg"].write_bytes(_jpeg_bytes(_scene(20)))
    out["unreadable.jpg"].chmod(0)
    if os.geteuid() == 0:  # root reads through any mode bits: make the read fail as it would for a user
        import builtins

        import engine.loader

        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if os.fspath(file) == str(out["unreadable.jpg"]):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(engine.loader, "open", guarded_open, raising=False)
    os.mkfifo(out["fifo.jpg"])  # opening it for reading would wait forever for a writer
    os.symlink("loop_b.jpg", out["loop_a.jpg"])
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")
    os.symlink("nowhere.jpg", out["dangling.jpg"])
    os.symlink(".", folder / "loop_dir")  # a folder loop: walked once, never forever
    return out


@pytest.fixture(scope="module")
def messy(tmp_path_factory, tiny_model):
    """One ingest of a folder holding every odd and every broken input."""
    root = tmp_path_factory.mktemp("messy")
    mp = pytest.MonkeyPatch()
    odd = build_odd(root / "photos")
    broken = build_broken(root / "photos" / "broken", mp)
    lib = Library(root / "home", device="cpu")
    try:
        report = ingest_paths(lib, [root / "photos"], CFG, model=tiny_model)
        yield lib, report, odd, broken, root
    finally:
        mp.undo()
        broken["unreadable.jpg"].chmod(0o644)
        lib.close()


def test_odd_but_valid_files_are_all_indexed(messy):
    lib, report, odd, broken, root = messy
    expected = {str(p) for p in odd.values()}
    known = lib.store.lookup_paths(sorted(expected))
    assert set(known) == expected
    assert report.added == len(odd) and report.duplicates == 0
    # exactly the odd files are indexed: the folder loop was walked once, folders are not images
    indexed = {p for p, _, _ in lib.store.iter_paths()}
    assert indexed == expected
    records = lib.store.get_images([s.image_id for s in known.values()])
    by_path = {r.path: r for r in records.values()}
    assert (by_path[str(odd["one_pixel.png"])].width, by_path[str(odd["one_pixel.png"])].height) == (1, 1)
    assert (by_path[str(odd["wide_strip.png"])].width, by_path[str(odd["wide_strip.png"])].height) == (2400, 3)
    assert by_path[str(odd["jpeg_named.png"])].format == "JPEG"
    assert by_path[str(odd["cmyk.jpg"])].format == "JPEG"
    index = lib.open_index()
    assert sorted(index.ids().tolist()) == sorted(lib.store.image_ids().tolist())


def test_odd_files_decode_to_what_they_show(messy):
    lib, report, odd, broken, root = messy
    gray = np.asarray(open_image(odd["gray16.png"])[0])
    assert gray.shape == (32, 48, 3) and gray.min() == 0 and gray.max() == 255  # 16-bit range scaled, not clipped
    pal = np.asarray(open_image(odd["palette_alpha.png"])[0])
    assert pal[0, 0].tolist() == [255, 255, 255] and pal[0, 47].tolist() == [0, 0, 255]  # transparent -> white
    cmyk = np.asarray(open_image(odd["cmyk.jpg"])[0]).astype(int)
    assert np.abs(cmyk - _scene(3)).mean() < 12
    rotated = np.asarray(open_image(odd["exif_rotated.jpg"])[0]).astype(int)
    assert rotated.shape == (32, 48, 3) and np.abs(rotated - _scene(5)).mean() < 6  # orientation applied
    # animated GIF: the first frame, and the vector is that frame's
    first = root / "first_frame.png"
    with Image.open(odd["animated.gif"]) as gif:
        gif.seek(0)
        gif.convert("RGB").save(first)
    done = embed_files(lib.encoder(), [odd["animated.gif"], first], workers=0)
    assert not done.failures
    np.testing.assert_allclose(done.embeddings[0], done.embeddings[1], atol=1e-5)


def test_broken_files_are_skipped_with_reasons_in_summary_and_report(messy):
    lib, report, odd, broken, root = messy
    reasons = dict(report.failed)
    assert set(reasons) == {str(p) for p in broken.values()} | {str(broken["loop_a.jpg"].with_name("loop_b.jpg"))}
    for name, phrase in BROKEN_REASONS.items():
        assert phrase in reasons[str(broken[name])].lower(), (name, reasons[str(broken[name])])
    for reason in reasons.values():
        assert "\n" not in reason and "Traceback" not in reason
    lines = Path(report.report_path).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path\treason" and len(lines) == 1 + len(reasons)
    assert {line.split("\t")[0] for line in lines[1:]} == set(reasons)


def test_rotated_copy_of_an_indexed_photo_finds_it_first(tmp_path, tiny_model):
    upright = _scene(42, (48, 32))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "original.jpg").write_bytes(_jpeg_bytes(upright))
    # a decoy holding the rotated pixels: what the query would match if orientation were ignored
    (photos / "decoy_rotated.jpg").write_bytes(_jpeg_bytes(np.rot90(upright).copy()))
    for seed in range(6):
        (photos / f"other_{seed}.jpg").write_bytes(_jpeg_bytes(_scene(100 + seed)))
    lib = Library(tmp_path / "home", device="cpu")
    ingest_paths(lib, [photos], CFG, model=tiny_model)
    exif = Image.Exif()
    exif[0x0112] = 6
    query = tmp_path / "from_the_phone.jpg"
    query.write_bytes(_jpeg_bytes(np.rot90(upright).copy(), exif=exif.tobytes()))
    [result] = search_library(lib, [str(query)], k=3)
    assert result.hits[0].path == str(photos / "original.jpg")
    assert result.hits[0].score > result.hits[1].score


def _cli(home, *args):
    return CliRunner().invoke(main, ["--home", str(home), "--device", "cpu", *map(str, args)])


def test_cli_never_shows_a_traceback_and_exit_codes_follow_the_outcome(tmp_path, tiny_model, monkeypatch):
    photos = tmp_path / "photos"
    build_odd(photos)
    broken = build_broken(photos / "broken", monkeypatch)
    home = tmp_path / "home"
    try:
        r = _cli(home, "ingest", photos, "--model", tiny_model, "--batch-size", 4, "--workers", 0)
        assert r.exit_code == 0, r.output
        assert "Traceback" not in r.output and "failed 12," in r.stdout
        for name in BROKEN_REASONS:
            assert f"failed: {broken[name]}" in r.stderr
        # JSON: the same failures, machine readable, and the non-UTF-8 name survives
        r = _cli(home, "ingest", photos, "--workers", 0, "--json")
        assert r.exit_code == 0, r.output  # nothing needed doing: still success
        summary = json.loads(r.stdout)
        assert summary["added"] == 0 and summary["failed"] == 12
        assert {f["path"] for f in summary["failures"]} >= {str(p) for p in broken.values()}
        if (photos / NON_UTF8).exists():
            r = _cli(home, "query", photos / NON_UTF8, "-k", 1, "--json")
            assert r.exit_code == 0, r.output
            # strict UTF-8 JSON: undecodable bytes as the text \xNN (engine.output)
            assert json.loads(r.stdout)["hits"][0]["path"] == json_text(str(photos / NON_UTF8))
        # every file failed: non-zero
        r = _cli(home, "ingest", photos / "broken", "--workers", 0)
        assert r.exit_code == 1 and "Traceback" not in r.output
        # a path that does not exist: non-zero, named
        r = _cli(home, "ingest", tmp_path / "no_such_folder", "--workers", 0)
        assert r.exit_code == 1 and "no_such_folder" in r.output and "Traceback" not in r.output
        # an empty folder: said so, non-zero (issue 14: a mistake is never a silent success)
        (tmp_path / "empty").mkdir()
        r = _cli(home, "ingest", tmp_path / "empty", "--workers", 0)
        assert r.exit_code == 1 and "no images found under" in r.output, r.output
        # querying a broken file or a folder named like an image: one-line errors, no traceback
        r = _cli(home, "query", broken["truncated.jpg"])
        assert r.exit_code == 1 and "truncated.jpg" in r.output and "Traceback" not in r.output
        r = _cli(home, "query", broken["fifo.jpg"])
        assert r.exit_code == 1 and "not a regular file" in r.output
    finally:
        broken["unreadable.jpg"].chmod(0o644)


def test_removed_images_never_come_back_from_a_query(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    paths = [make_image(photos / f"img_{i}.png", seed=300 + i) for i in range(6)]
    shutil.copy(paths[1], photos / "zz_copy_of_1.png")  # an alias of img_1
    home = tmp_path / "home"
    assert _cli(home, "ingest", photos, "--model", tiny_model, "--workers", 0).exit_code == 0
    outside = tmp_path / "query"
    outside.mkdir()
    for p in paths:
        shutil.copy(p, outside / p.name)

    def hits(name: str) -> list[str]:
        r = _cli(home, "query", outside / name, "-k", 10, "--json")
        assert r.exit_code == 0, r.output
        return [h["path"] for h in json.loads(r.stdout)["hits"]]

    assert hits("img_0.png")[0] == str(paths[0])
    r = _cli(home, "remove", paths[0])
    assert r.exit_code == 0 and "removed 1" in r.output
    assert str(paths[0]) not in hits("img_0.png")
    # removing a file that has a byte-identical copy keeps the copy findable
    assert _cli(home, "remove", paths[1]).exit_code == 0
    assert hits("img_1.png")[0] == str(photos / "zz_copy_of_1.png")
    # --prune forgets indexed files deleted from disk. (A removed file still on disk would be indexed
    # again by the next ingest of its folder: `engine remove` forgets, `--exclude` keeps out.)
    paths[0].unlink()
    paths[1].unlink()
    paths[2].unlink()
    r = _cli(home, "ingest", photos, "--prune", "--workers", 0, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["removed"] == 1
    found = hits("img_2.png")
    assert str(paths[2]) not in found and str(paths[0]) not in found and str(paths[1]) not in found
    lib = Library(home, device="cpu")
    index = lib.open_index()
    assert sorted(index.ids().tolist()) == sorted(lib.store.embedding_ids().tolist()) == \
        sorted(lib.store.image_ids().tolist())
    assert lib.store.count() == 4 and lib.store.count_aliases() == 0
