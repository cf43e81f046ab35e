"""data_pipelines.verify and `lsdr shards verify`: checksums, decodes, counts, exit status."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from data_pipelines.manifest import MANIFEST_NAME, read_manifest
from data_pipelines.verify import verify_shards
from data_pipelines.writer import write_shards
from lsdr_repr.cli import main as lsdr_main
from lsdr_repr.errors import DataError
from lsdr_repr.files import sha256_file
from tests.terminal import final_bars, run_into_a_log, run_on_a_terminal


@pytest.fixture
def shards(image_folder, tmp_path) -> Path:
    out = tmp_path / "shards"
    write_shards(image_folder, out, max_count=10, workers=1)
    return out


def rewrite_member(shard: Path, member_suffix: str, data: bytes, index: int = 0) -> None:
    """Replace the `index`-th member ending in `member_suffix` with `data` (a valid tar)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    hits = [i for i, (m, _) in enumerate(members) if m.name.endswith(member_suffix)]
    m, _ = members[hits[index]]
    m.size = len(data)
    members[hits[index]] = (m, data)
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, d in members:
            tar.addfile(m, io.BytesIO(d))


def update_manifest_checksum(root: Path, name: str) -> None:
    raw = json.loads((root / MANIFEST_NAME).read_text())
    for s in raw["shards"]:
        if s["name"] == name:
            s["sha256"], s["bytes"] = sha256_file(root / name), (root / name).stat().st_size
    (root / MANIFEST_NAME).write_text(json.dumps(raw))


def test_intact_shards_verify_ok(shards):
    report = verify_shards(shards, workers=2)
    assert report.ok and report.good == 24 and report.bad == 0
    assert [c.good for c in report.shards] == [10, 10, 4] and report.extra_files == []


def test_altered_bytes_fail_the_checksum_and_name_the_shard(shards, capsys):
    name = read_manifest(shards).shards[1].name
    data = bytearray((shards / name).read_bytes())
    data[-3000] ^= 0x01  # inside the last members, keeps the tar structure
    (shards / name).write_bytes(bytes(data))
    report = verify_shards(shards)
    assert not report.ok and [c.name for c in report.bad_shards] == [name]
    assert not report.bad_shards[0].sha256_ok
    assert lsdr_main(["shards", "verify", str(shards)]) == 1
    out = capsys.readouterr().out
    assert f"{name}: " in out and "sha256 MISMATCH" in out and "FAILED: 1 of 3 shards bad" in out


def test_undecodable_member_is_counted_even_with_a_matching_checksum(shards):
    name = read_manifest(shards).shards[0].name
    rewrite_member(shards / name, ".jpg", b"\xff\xd8 this is not a jpeg", index=2)
    rewrite_member(shards / name, ".cls", b"x", index=5)
    update_manifest_checksum(shards, name)
    report = verify_shards(shards)
    check = report.shards[0]
    assert check.sha256_ok and check.good == 8 and check.bad == 2 and not report.ok
    assert any("000000002: jpg: not an image" in p for p in check.problems)
    assert any("non-integer cls" in p for p in check.problems)


def test_missing_and_truncated_shards_are_reported(shards):
    names = [s.name for s in read_manifest(shards).shards]
    (shards / names[0]).unlink()
    data = (shards / names[2]).read_bytes()
    (shards / names[2]).write_bytes(data[: len(data) // 2])
    report = verify_shards(shards)
    by_name = {c.name: c for c in report.shards}
    assert "cannot read the shard" in by_name[names[0]].problems[0]
    assert by_name[names[1]].ok
    truncated = by_name[names[2]]
    assert not truncated.ok and truncated.good < 4
    assert any("tar read error" in p or "samples, the manifest says 4" in p
               for p in truncated.problems)


def test_missing_or_invalid_manifest_is_a_one_line_error(tmp_path, capsys):
    # a directory that is not there is named as such, not as a missing manifest inside it
    with pytest.raises(DataError, match=r"nowhere: no such directory$"):
        verify_shards(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/manifest\.json: no shard manifest"):
        verify_shards(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DataError, match=r"bad/manifest\.json: unreadable shard manifest"):
        verify_shards(tmp_path / "bad")
    (tmp_path / "bad" / MANIFEST_NAME).write_text('{"format": "lsdr-shards", '
                                                  '"format_version": 1, "shards": [{"name": 1}]}')
    with pytest.raises(DataError, match="malformed shard manifest"):
        verify_shards(tmp_path / "bad")
    assert lsdr_main(["shards", "verify", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"lsdr: error: {tmp_path / 'nowhere'}: no such directory\n"


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_verify_ok_draws_a_bar_on_a_terminal(shards, workers):
    done = run_on_a_terminal(["shards", "verify", str(shards), "--workers", str(workers)])
    assert done.returncode == 0 and "3 shards, 24 good samples, 0 bad: OK" in done.out
    # tqdm's bar on the terminal (stderr): one tick per shard, the sample counts as it goes
    final = final_bars(done.err)[f"verifying {shards}"]
    assert "3/3" in final and "bad=0, good=24" in final


def test_cli_verify_draws_no_bar_with_no_progress_or_into_a_log_file(shards, tmp_path):
    done = run_on_a_terminal(["shards", "verify", str(shards), "--no-progress"])
    assert (done.returncode, done.err) == (0, "") and "0 bad: OK" in done.out
    # stderr redirected to a file (SLURM's output, nohup's): no bar, and nothing else to say
    done = run_into_a_log(["shards", "verify", str(shards)], tmp_path / "verify.log")
    assert (done.returncode, done.err) == (0, "") and "0 bad: OK" in done.out
