"""Atomic, verifiable training checkpoints that resume after a crash, a preemption or a full disk.

    writer = CheckpointWriter(run_dir, keep=cfg.train.keep_checkpoints)   # rank 0
    writer.save({"step": step, "samples_seen": n, "model": model.state_dict(), ...})
    ...
    path = find_latest_valid(run_dir)          # newest checkpoint that verifies and loads
    state = load_checkpoint(path) if path else None

Layout: `RUN_DIR/checkpoints/step-{step:08d}.pt` (a `torch.save` dict, see `REQUIRED_KEYS`) next to
`step-{step:08d}.pt.sha256` (`sha256sum -c` format). The hash is computed while the file is written
and checked before it is loaded, because `torch.load` does not notice flipped bytes inside a tensor;
a truncated file fails to load as well. Everything stored must load with
`torch.load(weights_only=True)` (no arbitrary unpickling on resume): the writer proves this on the
temporary file before it replaces anything, and `capture_rng_state` turns the python and numpy RNG
states into tensors and primitives for that reason.

A save is atomic: temporary file in the same directory, write, flush, fsync, `os.replace`, fsync of
the directory. If anything fails (ENOSPC, EFBIG, EIO, an unstorable object) the temporary files are
removed, the earlier checkpoints are untouched, and a one-line `CheckpointError` says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from lsdr_repr.errors import CheckpointError
from lsdr_repr.files import fsync_dir, sha256_file
from lsdr_repr.rundir import checkpoint_dir, checkpoint_path, list_checkpoints

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# What every training checkpoint holds (the trainer writes them, resume and lsdr_repr.backbone
# read them); values may be None (e.g. no GradScaler).
REQUIRED_KEYS = (
    "format_version", "step", "samples_seen", "model", "optimizer", "scheduler", "scaler",
    "rng", "data_state", "config", "world_size", "wandb_run_id",
)
# What is needed to rebuild the model alone (export, evaluation): pass as `required=`.
MODEL_KEYS = ("format_version", "step", "model", "config")

_HASH_SUFFIX = ".sha256"
_TMP_SUFFIX = ".tmp"


# ----------------------------------------------------------------------------------- paths
def hash_path(path: Path) -> Path:
    """The sha256 sidecar of a checkpoint file."""
    return path.with_name(path.name + _HASH_SUFFIX)


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (hidden, so no glob matches it)."""
    return path.with_name(f".{path.name}{_TMP_SUFFIX}")


# ---------------------------------------------------------------------------------- writing
class CheckpointWriter:
    """Writes checkpoints of one run atomically and keeps the newest `keep` (<= 0: keep all).

    The checkpoint just written is never removed by the rotation, even when older files carry
    higher steps (a run that resumed from an earlier step after its newest file was corrupt).
    """

    def __init__(self, run_dir: str | Path, keep: int) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.folder = checkpoint_dir(run_dir)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create checkpoint directory {self.folder}: {exc.strerror or exc}"
            ) from None
        # Leftovers of a save that was killed half-way: never valid, only taking space.
        for entry in self.folder.glob(f".step-*{_TMP_SUFFIX}"):
            _remove_quietly(entry)

    def save(self, state: Mapping[str, Any]) -> Path:
        """Write `state` (a dict with the `REQUIRED_KEYS`) as step-{state["step"]}.pt; its path."""
        state = dict(state)
        state.setdefault("format_version", FORMAT_VERSION)
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"checkpoint state needs an integer 'step' >= 0, got {step!r}")
        missing = [k for k in REQUIRED_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint state for step {step} lacks {', '.join(missing)}")
        final = checkpoint_path(self.run_dir, step)
        try:
            self._write(state, final)
        except CheckpointError:
            raise
        except Exception as exc:  # any failure must leave the old files valid
            raise CheckpointError(self._failure_line(final, _describe(exc))) from exc
        self._rotate(final)
        return final

    def _write(self, state: dict, final: Path) -> None:
        tmp, tmp_hash = temp_path(final), temp_path(hash_path(final))
        try:
            digest = _save_hashed(state, tmp)
            _verify_weights_only(tmp, state)
            _write_durable(tmp_hash, f"{digest}  {final.name}\n".encode())
            # A stale sidecar from an earlier file of this step must not outlive the rename.
            _remove_quietly(hash_path(final))
            os.replace(tmp, final)
            os.replace(tmp_hash, hash_path(final))
        except _WriteFailed as exc:
            raise CheckpointError(self._failure_line(final, exc.reason)) from exc.__cause__
        finally:
            _remove_quietly(tmp)
            _remove_quietly(tmp_hash)
        fsync_dir(self.folder, "the checkpoint rename")

    def _failure_line(self, final: Path, reason: str) -> str:
        previous = [p for _, p in list_checkpoints(self.run_dir) if p != final]
        kept = (
            f"the previous checkpoint {previous[-1].name} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        return f"could not write checkpoint {final}: {reason}; {kept}"

    def _rotate(self, just_written: Path) -> None:
        if self.keep <= 0:
            return
        others = [p for _, p in list_checkpoints(self.run_dir) if p != just_written]
        for old in others[: max(0, len(others) - (self.keep - 1))]:
            _remove_quietly(old)
            _remove_quietly(hash_path(old))


class NullCheckpointWriter:
    """The writer of ranks != 0: same interface, writes nothing (rank 0 writes the shared file)."""

    def __init__(self, run_dir: str | Path | None = None, keep: int = 0) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.keep = keep

    def save(self, state: Mapping[str, Any]) -> Path | None:
        """The path rank 0 writes for this step (None without a run_dir); nothing is written."""
        if self.run_dir is None:
            return None
        return checkpoint_path(self.run_dir, int(state["step"]))


def make_checkpoint_writer(
    run_dir: str | Path, keep: int, rank: int
) -> CheckpointWriter | NullCheckpointWriter:
    return CheckpointWriter(run_dir, keep) if rank == 0 else NullCheckpointWriter(run_dir, keep)


class _WriteFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _HashingWriter:
    """File-like that hashes what passes through and keeps the OSError torch.save would hide.

    torch's zip writer turns a failed write into "unexpected pos ..."; the errno is what the user
    needs ("No space left on device").
    """

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha.update(data)
        return written

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as exc:
            self.error = exc
            raise


def _save_hashed(state: dict, tmp: Path) -> str:
    try:
        f = open(tmp, "wb")  # noqa: SIM115 - closed below, errors of close() matter
    except OSError as exc:
        raise _WriteFailed(_describe(exc)) from exc
    writer = _HashingWriter(f)
    try:
        try:
            torch.save(state, writer)
            writer.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
    except Exception as exc:
        # The OSError recorded by the writer names the cause torch's message hides.
        raise _WriteFailed(_describe(writer.error or exc)) from exc
    return writer.sha.hexdigest()


def _verify_weights_only(tmp: Path, state: dict) -> None:
    """Load the just-written file as a resume will (mmap: the tensor bytes are not read)."""
    try:
        torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        culprit = _find_unstorable(state, "state")
        what = f"{culprit} cannot be loaded with weights_only=True" if culprit else _describe(exc)
        raise _WriteFailed(what) from exc


def _write_durable(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _WriteFailed(_describe(exc)) from exc


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# Exact types: numpy scalars subclass float but are refused by the weights_only unpickler.
_PLAIN_TYPES = {int, float, bool, str, bytes, type(None), complex}
_TORCH_LEAVES = (torch.Tensor, torch.dtype, torch.device, torch.Size)


def _find_unstorable(obj: Any, where: str) -> str | None:
    """Path and type of the first value outside the plain types weights_only accepts, if any."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _find_unstorable(value, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        for i, value in enumerate(obj):
            found = _find_unstorable(value, f"{where}[{i}]")
            if found:
                return found
        return None
    if type(obj) in _PLAIN_TYPES or isinstance(obj, _TORCH_LEAVES):
        return None
    return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"


# ---------------------------------------------------------------------------------- reading
def load_checkpoint(path: str | Path, required: tuple[str, ...] = REQUIRED_KEYS) -> dict:
    """Verify (sha256 sidecar when present) and load a checkpoint with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sidecar = hash_path(path)
    if sidecar.is_file():
        try:
            expected = sidecar.read_text().split()[0]
        except (OSError, IndexError):
            message = f"{path}: its checksum file {sidecar.name} is unreadable"
            raise CheckpointError(message) from None
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(
                f"{path}: sha256 mismatch (file {actual[:12]}..., recorded {expected[:12]}...): "
                "the file is corrupt or truncated"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncation, garbage, unpickling errors
        raise CheckpointError(f"{path}: cannot be loaded ({_describe(exc)})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an lsdr-repr checkpoint (a {type(state).__name__})")
    version = state.get("format_version")
    if version is None:
        raise CheckpointError(f"{path}: not an lsdr-repr checkpoint (no format_version)")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is not supported (this version reads "
            f"{FORMAT_VERSION})"
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def load_latest(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of RUN_DIR that verifies and loads, with its state; None if none.

    Bad files are left in place (they may be wanted for a post-mortem) and named in a warning.
    """
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", path, _strip_path(str(exc), path))
    return None


def load_resume_state(run_dir: str | Path) -> tuple[Path, dict] | None:
    """What `lsdr train` resumes from: `load_latest`, but a run directory whose checkpoints all
    fail to verify or load raises `CheckpointError` naming them, rather than returning None.

    Starting again from step 0 there would overwrite the files (which may be repairable, or be a
    copy still in flight), reuse the W&B run id and duplicate the metrics of the lost steps.
    """
    found = list_checkpoints(run_dir)
    reasons = []
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            reason = _strip_path(str(exc), path)
            log.warning("skipping checkpoint %s: %s", path, reason)
            reasons.append(f"{path.name} ({reason})")
    if not reasons:
        return None
    raise CheckpointError(
        f"none of the checkpoints in {checkpoint_dir(run_dir)} can be read: "
        f"{'; '.join(reasons)}; not starting again from step 0 over them (move them away to "
        "start afresh)"
    )


def find_latest_valid(run_dir: str | Path) -> Path | None:
    """Path of the newest checkpoint of RUN_DIR that verifies and loads (see `load_latest`)."""
    found = load_latest(run_dir)
    return found[0] if found else None


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message.removeprefix(prefix)


# -------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA, once initialised) RNG states as weights_only data."""
    version, mt_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    # Asking for the CUDA state would create a context on every visible GPU: only when in use.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA states are restored for the devices present)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()),
                     py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((
        npy["kind"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]),
        int(npy["has_gauss"]), float(npy["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda) != count:
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d",
                        len(cuda), count)
        for device, device_state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(device_state, device)
