"""data_pipelines.writer: sources, odd and corrupt images, determinism, resume, CLI."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import png_bomb_header, save_image
from PIL import Image, ImageOps

from data_pipelines.manifest import MANIFEST_NAME, read_manifest
from data_pipelines.writer import parse_size, plan_shards, scan_source, write_shards
from lsdr_repr.cli import main as lsdr_main
from lsdr_repr.errors import DataError
from lsdr_repr.files import sha256_file
from tests.terminal import final_bars, run_into_a_log, run_on_a_terminal


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def samples_of(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over all shards of a directory, via the manifest."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(out).shards:
        for name, data in tar_members(out / shard.name).items():
            key, _, ext = name.partition(".")
            samples.setdefault(key, {})[ext] = data
    return samples


def by_source(out: Path) -> dict[str, dict[str, bytes]]:
    return {json.loads(s["json"])["source"]: s for s in samples_of(out).values()}


def decoded(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------ sources
def test_image_folder_source_writes_labelled_shards_and_manifest(image_folder, tmp_path):
    out = tmp_path / "out"
    result = write_shards(image_folder, out, prefix="train", max_count=7, workers=1)
    manifest = read_manifest(out)
    assert manifest.class_names == ("ant", "bee", "cat") and manifest.labelled
    assert manifest.num_samples == result.written == 24 and result.skipped == 0
    assert [s.name for s in manifest.shards] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s.num_samples for s in manifest.shards] == [7, 7, 7, 3]
    for shard in manifest.shards:
        path = out / shard.name
        assert path.stat().st_size == shard.bytes and sha256_file(path) == shard.sha256
    raw = json.loads((out / MANIFEST_NAME).read_text())
    assert raw["num_samples"] == 24 and raw["num_bytes"] == manifest.num_bytes
    assert raw["writer"]["version"] and raw["writer"]["options"]["max_count"] == 7
    samples = by_source(out)
    assert len(samples) == 24
    for source, members in samples.items():
        meta = json.loads(members["json"])
        cls_name = source.split("/")[0]
        assert meta["label_name"] == cls_name
        assert int(members["cls"]) == ["ant", "bee", "cat"].index(cls_name) == meta["label"]
        original = Image.open(image_folder / source)
        assert meta["original_size"] == list(original.size)
        if source.endswith(".jpg"):  # an RGB JPEG within size is stored byte for byte
            assert members["jpg"] == (image_folder / source).read_bytes()
            assert meta["reencoded"] is False
        else:
            assert members["jpg"][:2] == b"\xff\xd8" and meta["reencoded"] is True


def test_shards_are_shuffled_across_classes(image_folder, tmp_path):
    write_shards(image_folder, tmp_path / "out", max_count=8, workers=1)
    per_shard = [{json.loads(d)["label"] for n, d in tar_members(tmp_path / "out" / s.name).items()
                  if n.endswith(".json")} for s in read_manifest(tmp_path / "out").shards]
    assert any(len(labels) > 1 for labels in per_shard)  # not written class by class


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(5):
        save_image(tmp_path / "src" / ("sub" if i > 2 else "") / f"{i}.jpg", seed=i)
    write_shards(tmp_path / "src", tmp_path / "out", workers=1)
    manifest = read_manifest(tmp_path / "out")
    assert not manifest.labelled and manifest.class_names == () and manifest.num_samples == 5
    samples = by_source(tmp_path / "out")
    assert set(samples) == {"0.jpg", "1.jpg", "2.jpg", "sub/3.jpg", "sub/4.jpg"}
    assert all("cls" not in s for s in samples.values())


def test_an_output_folder_inside_the_source_is_not_a_class(image_folder, tmp_path):
    """`lsdr shards write imgs imgs/shards`, run twice (a resumed write): the second listing
    must not take `shards/` for a fourth class, which relabelled every class after it."""
    src = tmp_path / "imgs"
    shutil.copytree(image_folder, src)
    out = src / "shards"
    first = write_shards(src, out, workers=1)
    labels = {k: m["cls"] for k, m in by_source(out).items()}
    second = write_shards(src, out, workers=1)
    assert read_manifest(out).class_names == ("ant", "bee", "cat")
    assert first.written == second.written == 24 and second.skipped == 0
    assert {k: m["cls"] for k, m in by_source(out).items()} == labels


def test_csv_and_tsv_sources(tmp_path):
    for i in range(4):
        save_image(tmp_path / "img" / f"{i}.png", seed=i)
    (tmp_path / "named.csv").write_text(
        "path,label\nimg/0.png,zebra\nimg/1.png,apple\n" f"{tmp_path}/img/2.png,zebra\n")
    write_shards(tmp_path / "named.csv", tmp_path / "named", workers=1)
    manifest = read_manifest(tmp_path / "named")
    assert manifest.class_names == ("apple", "zebra")
    labels = {src: int(s["cls"]) for src, s in by_source(tmp_path / "named").items()}
    assert labels == {"img/0.png": 1, "img/1.png": 0, f"{tmp_path}/img/2.png": 1}

    (tmp_path / "ints.tsv").write_text("img/0.png\t3\nimg/3.png\t0\n")
    write_shards(tmp_path / "ints.tsv", tmp_path / "ints", workers=1)
    assert read_manifest(tmp_path / "ints").class_names == ("0", "1", "2", "3")
    assert {int(s["cls"]) for s in by_source(tmp_path / "ints").values()} == {0, 3}

    (tmp_path / "plain.csv").write_text("img/0.png\nimg/1.png\n")
    write_shards(tmp_path / "plain.csv", tmp_path / "plain", workers=1)
    assert not read_manifest(tmp_path / "plain").labelled

    (tmp_path / "mixed.csv").write_text("img/0.png,a\nimg/1.png\n")
    with pytest.raises(DataError, match=r"mixed\.csv:2: no label"):
        scan_source(tmp_path / "mixed.csv")


# ------------------------------------------------------------------------ odd and bad inputs
def make_odd_sources(src: Path) -> None:
    src.mkdir()
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(src / "cmyk.jpg")  # pure red
    Image.new("L", (16, 12), 77).save(src / "gray.png")
    pal = Image.new("P", (16, 12), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.paste(0, (0, 0, 6, 12))  # left columns: the transparent index
    pal.info["transparency"] = 0
    pal.save(src / "palette.png", transparency=0)
    Image.fromarray(np.full((12, 16), 65535, dtype=np.uint16)).save(src / "i16.png")
    rgba = np.zeros((12, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (10, 20, 200, 255)  # left half opaque blue, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")
    rotated = np.zeros((20, 40, 3), dtype=np.uint8)
    rotated[:, :20] = (255, 0, 0)
    rotated[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate 90 degrees clockwise
    Image.fromarray(rotated).save(src / "exif.jpg", exif=exif, quality=95)
    (src / "bomb.png").write_bytes(png_bomb_header(50000, 50000))
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.txt").write_text("not an image\n")
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        full, format="JPEG")
    (src / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    save_image(src / "plain.jpg", seed=3)


def test_odd_images_are_converted_and_bad_files_skipped_with_reasons(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_odd_sources(src)
    result = write_shards(src, out, workers=1)
    report = json.loads((out / "write_report.json").read_text())
    reasons = {s["path"]: s["reason"] for s in report["skipped_files"]}
    assert set(reasons) == {"bomb.png", "empty.jpg", "notes.txt", "truncated.jpg"}
    assert "decompression bomb" in reasons["bomb.png"]
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["notes.txt"]
    assert "undecodable" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.jpg"]
    assert result.skipped == report["skipped"] == read_manifest(out).skipped == 4
    assert result.written == report["written"] == 7

    samples = by_source(out)
    notes = {src_: json.loads(s["json"])["notes"] for src_, s in samples.items()}
    assert notes["cmyk.jpg"] == ["cmyk"] and notes["i16.png"] == ["16-bit"]
    assert notes["rgba.png"] == ["alpha"] and notes["palette.png"] == ["alpha"]
    assert notes["exif.jpg"] == ["exif-rotated"] and notes["plain.jpg"] == []
    assert report["conversions"]["alpha"] == 2

    def mean_colour(name, box=None):
        img = decoded(samples[name]["jpg"])
        if box:
            img = img[box[1]:box[3], box[0]:box[2]]
        return img.reshape(-1, 3).mean(0)

    assert np.allclose(mean_colour("cmyk.jpg"), (255, 0, 0), atol=12)
    assert np.allclose(mean_colour("gray.png"), (77, 77, 77), atol=3)
    assert np.allclose(mean_colour("i16.png"), (255, 255, 255), atol=3)  # scaled, not clipped
    assert np.allclose(mean_colour("palette.png", (9, 0, 16, 12)), (0, 200, 0), atol=8)
    assert np.allclose(mean_colour("palette.png", (0, 0, 4, 12)), (255, 255, 255), atol=8)
    assert np.allclose(mean_colour("rgba.png", (0, 0, 6, 12)), (10, 20, 200), atol=12)
    assert np.allclose(mean_colour("rgba.png", (10, 0, 16, 12)), (255, 255, 255), atol=12)
    # EXIF rotation applied: 40x20 stored -> 20x40 upright, the same as PIL's own transpose
    upright = decoded(samples["exif.jpg"]["jpg"])
    assert upright.shape == (40, 20, 3)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(src / "exif.jpg")), np.int16)
    assert np.abs(upright - expected).mean() < 4
    assert np.allclose(upright[:15].reshape(-1, 3).mean(0), (255, 0, 0), atol=20)
    assert np.allclose(upright[25:].reshape(-1, 3).mean(0), (0, 0, 255), atol=20)
    assert samples["plain.jpg"]["jpg"] == (src / "plain.jpg").read_bytes()


def test_max_side_reencodes_keeping_aspect_ratio(tmp_path):
    save_image(tmp_path / "src" / "big.jpg", (300, 150), seed=1)
    save_image(tmp_path / "src" / "small.jpg", (40, 30), seed=2)
    write_shards(tmp_path / "src", tmp_path / "out", max_side=64, workers=1)
    samples = by_source(tmp_path / "out")
    big = json.loads(samples["big.jpg"]["json"])
    assert big["size"] == [64, 32] and big["original_size"] == [300, 150] and big["reencoded"]
    assert Image.open(io.BytesIO(samples["big.jpg"]["jpg"])).size == (64, 32)
    assert samples["small.jpg"]["jpg"] == (tmp_path / "src" / "small.jpg").read_bytes()


def test_min_side_shrinks_the_shorter_side_and_never_enlarges(tmp_path):
    """The pre-shrink for a reader at image_size=N: wide images keep a shorter side of N (a
    longer-side bound would leave it below N and the reader would upsample them)."""
    save_image(tmp_path / "src" / "wide.jpg", (300, 100), seed=1)
    save_image(tmp_path / "src" / "tall.jpg", (90, 180), seed=3)
    save_image(tmp_path / "src" / "small.jpg", (40, 30), seed=2)
    write_shards(tmp_path / "src", tmp_path / "out", min_side=48, workers=1)
    samples = by_source(tmp_path / "out")
    assert Image.open(io.BytesIO(samples["wide.jpg"]["jpg"])).size == (144, 48)
    assert Image.open(io.BytesIO(samples["tall.jpg"]["jpg"])).size == (48, 96)
    assert samples["small.jpg"]["jpg"] == (tmp_path / "src" / "small.jpg").read_bytes()
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["writer"]["options"]["min_side"] == 48


def test_no_usable_file_is_an_error_with_a_report(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"none of its 1 files could be used"):
        write_shards(tmp_path / "src", tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert json.loads((tmp_path / "out" / "write_report.json").read_text())["skipped"] == 1
    with pytest.raises(DataError, match="no such source"):
        write_shards(tmp_path / "missing", tmp_path / "out2")
    with pytest.raises(DataError, match="cannot be the source"):
        write_shards(tmp_path / "src", tmp_path / "src")


def test_parse_size():
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 2**30
    assert parse_size("5000") == 5000 and parse_size("1.5k") == 1500
    with pytest.raises(DataError, match="as a size"):
        parse_size("lots")


# --------------------------------------------------------------------- determinism and resume
def shard_hashes(out: Path) -> list[tuple[str, str]]:
    return [(s.name, sha256_file(out / s.name)) for s in read_manifest(out).shards]


def test_same_seed_same_bytes_any_worker_count_other_seed_other_order(image_folder, tmp_path):
    write_shards(image_folder, tmp_path / "a", seed=7, max_count=5, workers=1)
    write_shards(image_folder, tmp_path / "b", seed=7, max_count=5, workers=2)
    write_shards(image_folder, tmp_path / "c", seed=8, max_count=5, workers=1)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == \
        (tmp_path / "b" / MANIFEST_NAME).read_bytes()
    assert [h for _, h in shard_hashes(tmp_path / "a")] != \
        [h for _, h in shard_hashes(tmp_path / "c")]
    assert set(by_source(tmp_path / "a")) == set(by_source(tmp_path / "c"))


def test_rerun_keeps_good_shards_and_rewrites_damaged_ones(image_folder, tmp_path):
    out = tmp_path / "out"
    write_shards(image_folder, out, max_count=5, workers=1)
    reference = shard_hashes(out)
    names = [n for n, _ in reference]
    damaged = bytearray((out / names[1]).read_bytes())
    damaged[700] ^= 0xFF
    (out / names[1]).write_bytes(bytes(damaged))
    (out / names[3]).unlink()
    (out / f".{names[2]}.tmp").write_bytes(b"half a shard")
    (out / "shard-000099.tar").write_bytes(b"left over from a bigger write")

    result = write_shards(image_folder, out, max_count=5, workers=1)
    assert result.shards_written == [names[1], names[3]]
    assert result.shards_reused == [n for n in names if n not in (names[1], names[3])]
    assert shard_hashes(out) == reference
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*names, MANIFEST_NAME, "write_report.json"])  # no hidden work folder once complete


def test_killed_write_resumes_to_identical_shards(tmp_path):
    """SIGKILL a real writer process mid-write, re-run it: the same bytes as one clean run."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs a FIFO to stop the writer at a known point")
    src = tmp_path / "src"
    lines = []
    for i in range(24):
        save_image(src / f"{i:02d}.jpg", (18, 14), seed=i)
        lines.append(f"src/{i:02d}.jpg")
    # One entry is a FIFO: reading it blocks, which holds the writer at a known shard.
    lines.append("src/blocker.jpg")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    seed = next(s for s in range(100) if _fifo_shard(tmp_path / "list.csv", s) >= 2)
    blocked_shard = _fifo_shard(tmp_path / "list.csv", seed)
    os.mkfifo(src / "blocker.jpg")

    out = tmp_path / "out"
    code = ("import sys; from data_pipelines.writer import write_shards; "
            f"write_shards({str(tmp_path / 'list.csv')!r}, {str(out)!r}, seed={seed}, "
            "max_count=4, workers=1)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        fd = _open_when_reader_waits(src / "blocker.jpg", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    names = [f"shard-{i:06d}.tar" for i in range(blocked_shard)]
    assert not (out / MANIFEST_NAME).exists()
    assert sorted(p.name for p in out.glob("*.tar")) == names  # only complete shards by name
    assert (out / f".shard-{blocked_shard:06d}.tar.tmp").exists()

    (src / "blocker.jpg").unlink()
    save_image(src / "blocker.jpg", (18, 14), seed=99)
    resumed = write_shards(tmp_path / "list.csv", out, seed=seed, max_count=4, workers=1)
    assert resumed.shards_reused == names
    clean = tmp_path / "clean"
    write_shards(tmp_path / "list.csv", clean, seed=seed, max_count=4, workers=1)
    assert shard_hashes(out) == shard_hashes(clean)
    assert (out / MANIFEST_NAME).read_bytes() == (clean / MANIFEST_NAME).read_bytes()
    assert not list(out.glob(".*.tmp"))


def _fifo_shard(csv_path: Path, seed: int) -> int:
    source = scan_source(csv_path)
    plan = plan_shards(source.items, seed=seed, prefix="shard", max_count=4, max_bytes=10**9,
                       encode_options={})
    return next(s.index for s in plan for _, it in s.items if it.rel == "src/blocker.jpg")


def _open_when_reader_waits(fifo: Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, "the writer exited before reaching the FIFO"
        time.sleep(0.02)
    raise AssertionError("the writer never opened the FIFO")


# ---------------------------------------------------------------------------------------- CLI
def test_cli_write_prints_a_summary(image_folder, tmp_path, capsys):
    code = lsdr_main(["shards", "write", str(image_folder), str(tmp_path / "out"), "--prefix",
                      "t", "--max-count", "10", "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "wrote 24 samples, 3 classes in 3 shards" in out
    assert f"manifest: {tmp_path / 'out' / MANIFEST_NAME}" in out
    code = lsdr_main(["shards", "write", str(tmp_path / "nope"), str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "nope: no such source" in err
    with pytest.raises(SystemExit) as info:
        lsdr_main(["shards", "write", "--help"])
    assert info.value.code == 0 and "example:" in capsys.readouterr().out


# ------------------------------------------------------------------- symlinks (issue 15)
def test_symlink_loops_repeats_and_links_out_of_the_source_are_listed_once_or_left_out(
        tmp_path):
    src = tmp_path / "src"
    for c in ("cat", "dog"):
        for i in range(3):
            save_image(src / c / f"{i}.png", seed=10 * len(c) + i)
    os.symlink("..", src / "dog" / "loop")  # a loop: src/dog/loop/dog/loop/... and every cat
    os.symlink("../cat", src / "dog" / "cats")  # cat images under the dog label
    os.symlink("/etc/passwd", src / "dog" / "passwd")  # a file out of the source
    os.symlink("../cat/0.png", src / "dog" / "again.png")  # one file listed twice
    (src / "dog" / "sub").mkdir()
    os.symlink("../../dog", src / "dog" / "sub" / "up")  # a loop one level down

    result = write_shards(src, tmp_path / "out", workers=1)
    assert result.written == 6  # the old writer: dozens, cat images labelled dog too
    labels = {s: int(m["cls"]) for s, m in by_source(tmp_path / "out").items()}
    assert labels == {f"{c}/{i}.png": n for n, c in enumerate(("cat", "dog")) for i in range(3)}
    report = json.loads((tmp_path / "out" / "write_report.json").read_text())
    reasons = {s["path"]: s["reason"] for s in report["skipped_files"]}
    assert set(reasons) == {"dog/loop", "dog/cats", "dog/passwd", "dog/again.png", "dog/sub/up"}
    assert "outside the source" in reasons["dog/passwd"]
    assert "same directory as ." in reasons["dog/loop"]
    assert "same file as cat/0.png" in reasons["dog/again.png"]


def test_follow_links_reads_links_out_of_the_source_but_still_breaks_loops(tmp_path):
    store = tmp_path / "store"
    for i in range(2):
        save_image(store / f"{i}.png", seed=i)
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    save_image(src / "a" / "x.png", seed=5)
    os.symlink(store, src / "b")  # a class folder kept elsewhere (a common layout)
    os.symlink("..", src / "a" / "loop")
    assert write_shards(src, tmp_path / "out", workers=1).written == 1  # b: left out
    result = write_shards(src, tmp_path / "out2", workers=1, follow_links=True)
    assert result.written == 3
    assert sorted(by_source(tmp_path / "out2")) == ["a/x.png", "b/0.png", "b/1.png"]


# ------------------------------------------------------- another dataset's shards (issue 15)
def test_writing_into_the_shards_of_another_dataset_is_refused_without_overwrite(
        image_folder, tmp_path, capsys):
    other = tmp_path / "other"
    for i in range(3):
        save_image(other / f"{i}.png", seed=50 + i)
    out = tmp_path / "out"
    write_shards(image_folder, out, max_count=5, workers=1)
    before = {p.name: sha256_file(p) for p in out.glob("*.tar")}
    code = lsdr_main(["shards", "write", str(other), str(out), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0] and str(image_folder) in err[0]
    assert {p.name: sha256_file(p) for p in out.glob("*.tar")} == before  # nothing deleted
    # The same source again resumes / keeps its shards; --overwrite replaces them.
    assert write_shards(image_folder, out, max_count=5, workers=1).shards_reused
    code = lsdr_main(["shards", "write", str(other), str(out), "--workers", "1", "--no-progress",
                      "--overwrite"])
    assert code == 0 and read_manifest(out).num_samples == 3


def test_the_bar_is_drawn_on_a_terminal_only(image_folder, tmp_path):
    """On a terminal the writer's bar counts the images; with stderr redirected to a file (a
    SLURM log, nohup's) tqdm's redraws would arrive joined by carriage returns, so no bar is
    drawn there. The summary lines are printed either way."""
    out = tmp_path / "tty"
    done = run_on_a_terminal(["shards", "write", str(image_folder), str(out), "--workers", "1"])
    assert done.returncode == 0 and "wrote 24 samples" in done.out
    assert "24/24" in final_bars(done.err)[f"writing {out}"]
    out = tmp_path / "logged"
    done = run_into_a_log(["shards", "write", str(image_folder), str(out), "--workers", "1"],
                          tmp_path / "write.log")
    assert done.returncode == 0 and "wrote 24 samples" in done.out
    assert done.err == ""  # nothing to log on success, and no bar
