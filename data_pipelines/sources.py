"""Shard sources: what `data.train_shards` (val/test, eval commands, each `data.sources` entry)
may name, turned into the list of shard URLs the reader streams and the manifest, if any.

A source spec is one of, or several joined with `::` (webdataset's separator):
  - a local directory: its `manifest.json` when it has one, else every `*.tar` in it (sorted);
  - a `manifest.json` (local path or URL); it may name a `shard_root` elsewhere;
  - local shard paths with brace patterns and globs: `data/{a,b}/train-*.tar`;
  - `http://` / `https://` URLs with brace patterns (opened by webdataset's curl handler);
  - `pipe:` commands whose stdout is a tar (`pipe:aws s3 cp s3://b/x.tar -`);
  - fsspec URLs: `s3://`, `gs://`, `az://`, `memory://`, `file://` ... with braces, globs and
    directories (listed and opened through fsspec; its filesystem package is an optional extra,
    `pip install 'lsdr-repr[s3]'`; a missing one is a one-line `DataError` naming the extra).
Shards need no manifest: one is used when it sits next to them (a directory's, or the sibling
`manifest.json` of the shards a pattern names) and gives sample counts for epoch accounting.

Opening stays webdataset's: its `gopen` dispatch table (`webdataset.gopen.gopen_schemes`) gets a
handler for each fsspec scheme in use (`register_openers`, also called in every loader worker),
so the reader's `tarfile_samples` opens every kind the same way. `check_readable` opens the
first shard of a source at start-up, so an unreachable URL, a failing command or a missing extra
is one error naming the source before training starts, not epochs of skipped "corrupt" samples.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from data_pipelines.manifest import (
    MANIFEST_NAME,
    Manifest,
    load_manifest_file,
    parse_manifest,
)
from lsdr_repr.errors import DataError, LsdrError

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WRITE_STATE_DIR = ".lsdr-write"  # the writer's state folder (data_pipelines.writer.STATE_DIR)
# Schemes webdataset opens itself (gopen: curl, subprocesses, plain files). Everything else with
# a `://` goes through fsspec; `gs` too, as gcsfs rather than webdataset's `gsutil` subprocess.
NATIVE_SCHEMES = frozenset({"", "pipe", "http", "https", "file", "ais", "sftp", "ftps", "scp",
                            "htgs", "hf"})
# fsspec implementation package -> this project's extra that installs it
EXTRAS = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure"}
SCHEME_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure",
                 "abfs": "azure", "abfss": "azure", "adl": "azure"}
CURL_EXITS = {6: "could not resolve the host", 7: "could not connect", 22: "HTTP error status",
              28: "timed out", 35: "TLS handshake failed", 56: "connection reset"}
GLOB_CHARS = re.compile(r"[*?\[]")
# http(s) cannot be listed, and `?` (a query, a presigned URL) and `[` (an IPv6 host) are common
HTTP_GLOB = re.compile(r"\*")


@dataclass(frozen=True)
class Source:
    """One resolved source: its spec as written, its shard URLs, its manifest (or None)."""

    spec: str
    urls: tuple[str, ...]
    manifest: Manifest | None


# ------------------------------------------------------------------------------- url kinds
def scheme(url: str) -> str:
    """"" for a local path, "pipe" for `pipe:`, else the URL scheme (lower case)."""
    if url.startswith("pipe:"):
        return "pipe"
    if "://" not in url:
        return ""
    return urlparse(url).scheme.lower()


def is_remote(url: str) -> bool:
    """True for what webdataset opens itself or through fsspec, not a plain local path."""
    return scheme(url) != ""


def uses_fsspec(url: str) -> bool:
    return scheme(url) not in NATIVE_SCHEMES


def _lists_with_fsspec(url: str) -> bool:
    """Listing (globs, directories, manifest look-ups) goes through fsspec for these."""
    return uses_fsspec(url) or scheme(url) == "file"


# ----------------------------------------------------------------------------------- fsspec
def filesystem_class(url: str, name: str = "") -> Any:
    """The fsspec filesystem class of `url`'s scheme; `DataError` (naming `name`, default `url`)
    with the extra to install when its package is missing, or for a scheme no one knows."""
    proto = scheme(url)
    name = name or url
    extra = SCHEME_EXTRAS.get(proto, "fsspec")
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{name}: {proto}:// URLs need fsspec: pip install "
                        f"'lsdr-repr[{extra}]'") from None
    try:
        return fsspec.get_filesystem_class(proto)
    except ImportError:
        package = _implementation_package(proto)
        extra = EXTRAS.get(package, SCHEME_EXTRAS.get(proto))
        hint = f"'lsdr-repr[{extra}]'" if extra else package
        raise DataError(f"{name}: {proto}:// URLs need {package}: pip install {hint}") from None
    except ValueError:
        raise DataError(f"{name}: unknown URL scheme {proto}:// (neither webdataset nor fsspec "
                        f"knows it)") from None


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of `url`; `DataError` naming the extra it needs."""
    proto = scheme(url)
    cls = filesystem_class(url)
    try:
        fs = cls(**cls._get_kwargs_from_urls(url))
    # fsspec filesystems raise their own types (botocore's NoCredentialsError ...): report any
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{url}: cannot set up the {proto}:// filesystem ({_reason(exc)})") \
            from None
    return fs, cls._strip_protocol(url)


def _implementation_package(proto: str) -> str:
    from fsspec.registry import known_implementations

    path = known_implementations.get(proto, {}).get("class", "")
    return path.split(".", 1)[0] or f"an fsspec filesystem for {proto}://"


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """webdataset `gopen` handler for fsspec URLs (registered by `register_openers`)."""
    fs, path = filesystem(url)
    return fs.open(path, mode)


# http(s) reads: webdataset's curl command with a limit on a stalled transfer. Without one, a
# server that accepts the connection and never sends (a hung proxy or CDN node) blocks the
# reader for ever. curl retries a stalled transfer as a transient error, so the retries are
# fewer than webdataset's 30; longer outages are the reader's (`data.stall_timeout_s`).
HTTP_STALL_S = 60  # slower than 1 byte/s for this long: broken off (curl exit 28)
HTTP_RETRIES = 5


def gopen_http(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """webdataset's `gopen_curl`, reading with `HTTP_STALL_S` and `HTTP_RETRIES`."""
    from webdataset.gopen import Pipe, gopen_curl

    if mode[0] != "r":
        return gopen_curl(url, mode, bufsize)
    cmd = ["curl", "--connect-timeout", "30", "--retry", str(HTTP_RETRIES), "--retry-delay", "2",
           "--speed-limit", "1", "--speed-time", str(HTTP_STALL_S), "-f", "-s", "-L", url]
    return Pipe(cmd, mode=mode, bufsize=bufsize, ignore_status=[141, 23])


def register_openers(urls: Sequence[str]) -> None:
    """Give webdataset's `gopen` a handler for every fsspec scheme among `urls`, and for http(s)
    `gopen_http` (idempotent; called in each loader worker too, which may not share the
    parent's table)."""
    from webdataset.gopen import gopen_schemes

    for proto in {scheme(u) for u in urls if uses_fsspec(u)}:
        gopen_schemes[proto] = gopen_fsspec
    if any(scheme(u) in ("http", "https") for u in urls):
        gopen_schemes["http"] = gopen_schemes["https"] = gopen_http


# ------------------------------------------------------------------------------- resolving
def resolve_source(spec: str | os.PathLike) -> Source:
    """Shard URLs and manifest of one source spec (see the module docstring).

    Raises `DataError` naming the spec when it names nothing or a local shard is missing.
    Nothing remote is read beyond listings and a manifest; see `check_readable`.
    """
    text = str(spec).strip()
    if not text:
        raise DataError("no shards given (an empty shard spec)")
    try:
        return _resolve(text)
    except DataError as exc:  # e.g. a sibling manifest's URL: say which source it was for
        message = str(exc)
        raise DataError(message if text in message else f"{text}: {message}") from None


def _resolve(text: str) -> Source:
    parts = _expand(text)
    for proto in dict.fromkeys(scheme(p) for p in parts if uses_fsspec(p)):
        filesystem_class(f"{proto}://", text)  # a missing extra, before any file of the spec
    if len(parts) == 1 and not GLOB_CHARS.search(parts[0]):
        whole = _resolve_single(parts[0], text)
        if whole is not None:
            return whole
    urls = _list(parts, text)
    return Source(text, tuple(urls), _sibling_manifest(urls))


def list_shards(spec: str | os.PathLike) -> list[str]:
    """The shard URLs a spec names, ignoring any manifest (what `lsdr shards index` reads)."""
    text = str(spec).strip()
    if not text:
        raise DataError("no shards given (an empty shard spec)")
    return _list(_expand(text), text)


def _list(parts: list[str], text: str) -> list[str]:
    """Shard URLs of expanded parts: directories listed, globs matched, the rest as written."""
    urls: list[str] = []
    for part in parts:
        urls += _directory_shards(part, text) if _is_directory(part) else _expand_part(part, text)
    if not urls:
        raise DataError(f"{text}: the shard pattern matches nothing")
    _check_local(urls, f"{text}: the pattern names")
    return urls


def _expand(text: str) -> list[str]:
    """`::` and brace expansion exactly as webdataset does it (its `expand_urls`)."""
    from webdataset.shardlists import expand_urls

    return [u if is_remote(u) else os.path.expanduser(u) for u in expand_urls(text)]


def _resolve_single(part: str, text: str) -> Source | None:
    """A directory or a manifest (local or remote) as a whole source; None for a shard."""
    if not is_remote(part) and not os.path.exists(part):
        where = Path(part)
        # the shipped configs' default data, on a fresh clone before `lsdr demo` wrote it
        hint = (f" (the embedded sample data: `lsdr shards sample {where.parent}` writes it)"
                if where.parent.name == "sample" and where.name in ("train", "val", "test")
                else "")
        raise DataError(f"{part}: no such shard file or directory{hint}")
    if part.endswith(".json"):
        manifest = _load_manifest(part)
        _check_local(manifest.urls(), f"{part} lists")
        return Source(text, tuple(manifest.urls()), manifest)
    if not _is_directory(part):
        return None
    manifest = _manifest_in(part)
    if manifest is not None:
        _check_local(manifest.urls(), f"{_join(part, MANIFEST_NAME)} lists")
        return Source(text, tuple(manifest.urls()), manifest)
    return Source(text, tuple(_directory_shards(part, text)), None)


def _is_directory(part: str) -> bool:
    kind = scheme(part)
    if kind == "":
        return Path(part).is_dir()
    # before any request: a pattern of 10,000 shard URLs must not cost 10,000 look-ups
    if kind == "pipe" or part.endswith(SHARD_SUFFIXES) or GLOB_CHARS.search(part):
        return False
    if _lists_with_fsspec(part):
        fs, path = filesystem(part)
        return _fs_call(part, fs.isdir, path)
    # http(s): a URL of a folder (ending in "/" or without a suffix) needs a manifest there
    return part.endswith("/") or "." not in posixpath.basename(urlparse(part).path)


def _directory_shards(part: str, text: str) -> list[str]:
    kind = scheme(part)
    if kind == "":
        if (Path(part) / WRITE_STATE_DIR).is_dir():
            raise DataError(f"{part}: `lsdr shards write` has not finished here (no "
                            f"{MANIFEST_NAME} yet): re-run it to complete the write")
        urls = sorted(str(p) for p in Path(part).iterdir()
                      if p.name.endswith(SHARD_SUFFIXES) and p.is_file())
    elif _lists_with_fsspec(part):
        fs, path = filesystem(part)
        found = _fs_call(part, fs.ls, path, detail=False)
        urls = sorted(_unstrip(fs, p) for p in found if str(p).endswith(SHARD_SUFFIXES))
    else:
        raise DataError(f"{part}: an {kind}:// folder cannot be listed: name the shards "
                        f"(a brace pattern such as {_join(part, 'train-{000000..000099}.tar')}) "
                        f"or put a {MANIFEST_NAME} there (`lsdr shards index`)")
    if not urls:
        raise DataError(f"{part}: no {MANIFEST_NAME} and no .tar shards in this directory")
    return urls


def _expand_part(part: str, text: str) -> list[str]:
    """One brace-expanded piece: globbed when it has glob characters."""
    kind = scheme(part)
    if not GLOB_CHARS.search(part) or kind == "pipe":
        return [part]
    if kind == "":
        return sorted(glob.glob(part))
    if not _lists_with_fsspec(part):
        if not HTTP_GLOB.search(part):
            return [part]
        raise DataError(f"{part}: {kind}:// URLs cannot be globbed: use a brace pattern "
                        f"({{000000..000099}})")
    fs, path = filesystem(part)
    return sorted(_unstrip(fs, p) for p in _fs_call(part, fs.glob, path))


def _unstrip(fs: Any, path: str) -> str:
    """A path fsspec listed, as a URL again (`s3://bucket/key`, `file:///abs/path`)."""
    return str(path) if "://" in str(path) else fs.unstrip_protocol(str(path))


def _fs_call(url: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{url}: no such file or directory") from None
    except Exception as exc:  # noqa: BLE001 (permissions, network, credentials, any fsspec type)
        raise DataError(f"{url}: cannot list ({_reason(exc)})") from None


def _check_local(urls: Sequence[str], what: str) -> None:
    for url in urls:
        if not is_remote(url) and not os.path.isfile(url):
            raise DataError(f"{what} a shard that does not exist: {url}")


# ------------------------------------------------------------------------------- manifests
def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if is_remote(base) else str(Path(base) / name)


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_remote(url) else str(Path(url).parent)


def _manifest_in(directory: str) -> Manifest | None:
    """The manifest of a directory (local or remote), None when it has none."""
    path = _join(directory, MANIFEST_NAME)
    if not is_remote(path):
        return load_manifest_file(Path(path)) if Path(path).is_file() else None
    data = read_bytes(path, missing_ok=True)
    return None if data is None else _parse_remote(path, data)


def _load_manifest(url: str) -> Manifest:
    if not is_remote(url):
        return load_manifest_file(Path(url))
    data = read_bytes(url, missing_ok=True)
    if data is None:
        raise DataError(f"{url}: no shard manifest here")
    return _parse_remote(url, data)


def _parse_remote(url: str, data: bytes) -> Manifest:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{url}: unreadable shard manifest ({exc})") from None
    # `root` only names the manifest for messages; the shards are under `location`.
    return parse_manifest(raw, url, root=Path(_dirname(url)), location=_dirname(url))


def _sibling_manifest(urls: Sequence[str]) -> Manifest | None:
    """The manifest of the one directory holding all the shards, restricted to those shards;
    None when there is none or it does not describe every one of them (do not guess)."""
    if any(scheme(u) == "pipe" for u in urls):
        return None
    parents = {_dirname(u) if is_remote(u) else str(Path(u).resolve().parent) for u in urls}
    if len(parents) != 1:
        return None
    full = _manifest_in(parents.pop())
    if full is None:
        return None
    wanted = {posixpath.basename(u) if is_remote(u) else Path(u).name for u in urls}
    shards = tuple(s for s in full.shards if s.name in wanted)
    if len(shards) != len(wanted):
        return None
    return Manifest(root=full.root, shards=shards, class_names=full.class_names,
                    labelled=full.labelled, skipped=full.skipped, writer=full.writer,
                    location=full.location)


# --------------------------------------------------------------------------- reading checks
def read_bytes(url: str, *, missing_ok: bool = False) -> bytes | None:
    """The whole (small) file at `url` through webdataset's `gopen`.

    With `missing_ok` (an optional manifest) a file that is not there, or cannot be read, gives
    None: for http(s) curl cannot tell the two apart, and a bucket may deny reading a missing key
    without a listing permission. The shards themselves are checked by `check_readable`.
    """
    from webdataset.gopen import gopen

    register_openers([url])
    try:
        with gopen(url) as stream:
            return stream.read()
    except DataError:
        raise  # a missing extra: nothing of this source can be read
    except FileNotFoundError:
        if missing_ok:
            return None
        raise DataError(f"{url}: no such file") from None
    except Exception as exc:  # noqa: BLE001 (curl's exit status, each fsspec's own types)
        if not missing_ok:
            raise DataError(f"{url}: cannot be read ({_reason(exc, url)})") from None
        if scheme(url) not in ("http", "https"):
            log.warning("%s: cannot be read (%s); going on without it", url, _reason(exc, url))
        return None


def check_readable(url: str, source: str) -> None:
    """Open `url` as the stream will (webdataset's gopen) and read its first tar block.

    An unreachable URL, a failing `pipe:` command, missing credentials or a missing extra fail
    here, at start-up, as one `DataError` naming the source, instead of as skipped samples.
    What the bytes are is not judged here: a corrupt or empty shard is the stream's to skip.
    """
    from webdataset.gopen import gopen, set_options

    register_openers([url])
    what = source if source == url else f"{source}: {url}"
    head = b""
    try:
        stream = gopen(url)
        head = stream.read(512)
        if len(head) == 512:
            # We stop reading early: the writer of a pipe then exits on SIGPIPE or with a
            # write error (curl: 23), which is not a failure of the source.
            set_options(stream, ignore_errors=True)
        stream.close()
    except DataError:
        raise
    # gopen raises ValueError (no handler), OSError (a command's exit status), and fsspec
    # filesystems their own types: any of them means this source cannot be read.
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{what}: cannot be read ({_reason(exc, url)})") from None


def readable_source(spec: str, key: str = "") -> Source:
    """`resolve_source(spec)` with its first shard opened (`check_readable`): a source that
    cannot be read fails here in one line, led by the config `key` that named it."""
    try:
        source = resolve_source(spec)
        check_readable(source.urls[0], source.spec)
    except LsdrError as exc:
        raise type(exc)(f"{key}: {exc}" if key else str(exc)) from None
    return source


def _reason(exc: BaseException, url: str = "") -> str:
    """A short reason for a failed open or read (curl's and commands' exit codes explained)."""
    text = str(exc.args[0]) if getattr(exc, "args", None) else str(exc)
    exit_code = re.search(r": exit (\d+)", text)
    if exit_code:
        code = int(exit_code.group(1))
        if scheme(url) in ("http", "https"):
            return f"curl exit {code}: {CURL_EXITS.get(code, 'see `man curl`')}"
        return f"the command exited with status {code}"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    text = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]
