"""Run-directory I/O through fsspec, so `out` can be a local path, file://, s3:// ...

Writes that a reader must never see half-done go through :func:`atomic_write`: local files are
written beside the target and renamed (atomic on POSIX); object stores only show an object once
its upload completes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import uuid

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from sdn_dist.errors import UserError


def write_os_error(e: BaseException, directory: str | None) -> OSError | None:
    """The OSError behind a failed write, or None if it was not one. torch.save's C++ writer
    reports a full disk as a RuntimeError ("unexpected pos ...", "file write failed"); then the
    local ``directory`` is probed with a small write to learn the real cause."""
    if isinstance(e, OSError):
        return e
    msg = str(e)
    if directory is None or not isinstance(e, RuntimeError) or not any(
            k in msg for k in ("inline_container", "PytorchStreamWriter", "file write failed")):
        return None
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as oe:
        return oe
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None


@contextlib.contextmanager
def writing(url: str):
    """A failed write (disk full, read-only, no permission) is the user's to fix: say which file."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        lp = local_path(url)
        oe = write_os_error(e, (os.path.dirname(lp) or ".") if lp else None)
        if oe is None:
            raise
        raise UserError(f"cannot write {url}: {oe.strerror or oe}") from e


def url_to_fs(url: str):
    check_bucket(url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


# -------------------------------------------------------------------------------- object stores
# The standard AWS environment configures s3:// unchanged (botocore >= 1.31 reads
# AWS_ENDPOINT_URL itself, and s3fs builds its client through botocore).
_S3_PROTOCOLS = ("s3", "s3a")
_checked_buckets: set[tuple] = set()


def s3_endpoint() -> str:
    """Where s3:// goes, for messages: the S3-compatible server the environment names, or AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def check_bucket(url: str, name: str | None = None, network_errors: bool = False) -> None:
    """For an s3:// URL: in seconds, that the endpoint answers, the credentials are accepted and
    the bucket exists, else a UserError naming the URL (``name``: the URL as the user wrote it,
    e.g. the brace pattern ``url`` came from). Once per bucket, endpoint and key id in a
    process; other URLs pass untouched.

    Without this a missing bucket would be created by the first write (s3fs's makedirs does),
    wrong credentials would read as "no checkpoints yet" (s3fs's exists() swallows a 403), and an
    unreachable endpoint would surface inside every Ray worker after minutes of retries.
    ``network_errors``: an endpoint that refuses or drops the connection raises botocore's own
    error instead, for a caller that retries (shard URLs: data.retries, ``shards._with_retries``).
    """
    proto, sep, rest = url.partition("://")
    if not sep or proto.lower() not in _S3_PROTOCOLS:
        return
    bucket = rest.split("/", 1)[0]
    where = s3_endpoint()
    url = name or url
    key = (bucket, where, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    if key in _checked_buckets:
        return
    if not bucket:
        raise UserError(f"{url}: no bucket in the URL (s3://BUCKET/prefix)")
    # lazy: s3fs and botocore add ~0.2 s and ~20 MB to every process that imports sdn_dist.data
    # (reader actors included), and only s3:// URLs need them (fsspec loads s3fs lazily too)
    import s3fs
    from botocore.exceptions import BotoCoreError
    # Short timeouts and few attempts: this is a yes/no question asked before anything starts.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
        "connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2, "mode": "standard"}})
    fs.retries = 1   # s3fs's own retry loop (a class attribute), on top of botocore's
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError   # a connection reset or closed, a read timeout
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise UserError(f"{url}: bucket {bucket!r} does not exist at {where}") from None
    except PermissionError as e:
        raise UserError(f"{url}: access to bucket {bucket!r} at {where} denied ({_one_line(e) or 'Forbidden'}); "
                        "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
    except BotoCoreError as e:   # endpoint unreachable, connect timeout, no credentials at all
        if network_errors and isinstance(e, (BotoConnectionError, HTTPClientError)):
            raise
        raise UserError(f"{url}: cannot reach bucket {bucket!r} at {where}: {_one_line(e)}") from None
    _checked_buckets.add(key)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def is_local(url: str) -> bool:
    return isinstance(url_to_fs(url)[0], LocalFileSystem)


def local_path(url: str) -> str | None:
    """The local filesystem path of a URL, or None if it is remote."""
    fs, path = url_to_fs(url)
    return os.path.abspath(path) if isinstance(fs, LocalFileSystem) else None


def arrow_storage(url: str):
    """``(storage_path, storage_filesystem)`` for Ray Train's RunConfig: a local path as is, a
    remote URL through this same fsspec filesystem (pyarrow's FSSpecHandler), so Ray Train's own
    run state lands beside the run on s3:// with the same standard AWS environment, never on one
    node's disk (Ray rejects a node-local storage_path on a multi-node cluster)."""
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return os.path.abspath(path), None
    # lazy: pyarrow adds ~27 MB to every process that imports sdn_dist.data (reader actors
    # included); only the driver's Ray Train storage on a remote `out` needs it
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    return path, PyFileSystem(FSSpecHandler(fs))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/")] + [p.strip("/") for p in parts])


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def load_torch(url: str, what: str, error: type[UserError] = UserError, map_location="cpu"):
    """``torch.load(weights_only=True)`` from any fsspec URL: tensors and plain data only, never
    code. Any failure (missing, truncated, not torch, unsafe pickle) is ``error`` naming ``what``
    and the file."""
    try:
        with fsspec.open(url, "rb") as f:
            # torch.load needs random access; remote files that cannot seek are read whole.
            src = f if f.seekable() else io.BytesIO(f.read())
            return torch.load(src, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise error(f"{what} {url}: file not found") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, unsafe pickle, network error
        lines = [l for l in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if l.strip()]
        why = f"{type(e).__name__}: {lines[0].split('. ')[0][:200]}" if lines else type(e).__name__
        raise error(f"{what} {url}: not a readable torch file ({why})") from None


def read_text(url: str) -> str:
    with fsspec.open(url, "r") as f:
        return f.read()


def atomic_write(url: str, data: bytes | str) -> None:
    with writing(url):
        _atomic_write(url, data)


def _atomic_write(url: str, data: bytes | str) -> None:
    if isinstance(data, str):
        data = data.encode()
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:  # a failed write (disk full) leaves no half file behind
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def append_lines(url: str, lines: list[str]) -> None:
    if not lines:
        return
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        with writing(url), open(path, "a") as f:
            f.write("".join(l + "\n" for l in lines))
    else:  # object stores cannot append: rewrite (metrics files stay small)
        old = fs.cat_file(path).decode() if fs.exists(path) else ""
        with writing(url), fs.open(path, "w") as f:
            f.write(old + "".join(l + "\n" for l in lines))
