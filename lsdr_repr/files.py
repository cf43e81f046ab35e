"""File helpers every writer shares: content digests and durable renames."""

from __future__ import annotations

import errno
import hashlib
import logging
import os

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike, chunk: int = READ_CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: str | os.PathLike, what: str = "a rename") -> None:
    """Make the renames in `folder` durable. Some network file systems cannot open or fsync a
    directory: that is logged (naming `what` was not made durable), never raised, because the
    rename itself has happened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        log.warning("could not open %s to make %s durable: %s", folder, what, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # EINVAL/ENOTSUP/EBADF: the file system does not fsync directories (nothing to report)
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            log.warning("fsync of %s failed (%s): %s may not be durable", folder, exc, what)
    finally:
        os.close(fd)

