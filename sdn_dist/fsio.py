"""Run-directory I/O through fsspec, so `out` can be a local path, file://, s3:// ...

Writes that a reader must never see half-done go through :func:`atomic_write`: local files are
written beside the target and renamed (atomic on POSIX); object stores only show an object once
its upload completes.
"""

from __future__ import annotations

import os
import uuid

import contextlib

import fsspec
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
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(url_to_fs(url)[0], LocalFileSystem)


def local_path(url: str) -> str | None:
    """The local filesystem path of a URL, or None if it is remote."""
    fs, path = url_to_fs(url)
    return os.path.abspath(path) if isinstance(fs, LocalFileSystem) else None


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
    import io
    import re

    import torch
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
