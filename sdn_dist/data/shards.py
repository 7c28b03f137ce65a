"""Shard URLs, opening through fsspec, in-memory tar iteration, counting and inspection.

    from sdn_dist.data.shards import expand_urls, shard_counts, inspect_shards
    urls = expand_urls("shards/synth/train-{000000..000003}.tar")
    counts = shard_counts(urls)          # from shardindex.json when current, else tar headers

Shards follow the WebDataset / img2dataset convention: consecutive tar members that share a key
(``KEY.png``, ``KEY.txt``, ``KEY.json``, ``KEY.emb.npy``) form one sample; the key is everything
before the first dot of the file name (webdataset's ``base_plus_ext``). Members are only ever read
into memory: nothing is extracted, so a member called ``../../etc/x`` is just a strange key.

URLs are opened through fsspec, so local paths, ``file://``, ``http(s)://`` and ``s3://`` all work
(webdataset 1.0.2 alone opens local files or shells out to curl; :func:`register_fsspec_gopen`
points its ``gopen`` at fsspec too, for code that uses ``wds.WebDataset`` directly).
"""

from __future__ import annotations

import asyncio
import collections
import glob as _glob
import io
import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import fsspec
from braceexpand import braceexpand
from webdataset import gopen
from webdataset.tariterators import base_plus_ext

from sdn_dist.errors import DataError, UserError
from sdn_dist.fsio import check_bucket

log = logging.getLogger(__name__)

# A member larger than this is refused rather than read into memory (a shard sample is an image,
# a caption and a little metadata; gigabytes mean a broken or hostile shard).
MAX_MEMBER_BYTES = 512 * 1024 * 1024
_GLOB_CHARS = "*?["
TAR_EXTS = (".tar", ".tar.gz", ".tgz")


# ----------------------------------------------------------------------------------------------
# URLs
# ----------------------------------------------------------------------------------------------

def split_protocol(url: str) -> tuple[str | None, str]:
    """'s3://b/k' -> ('s3', 'b/k'); 'file:///x' -> (None, '/x'); '/x' -> (None, '/x')."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        proto = proto.lower()
        if proto == "file":
            return None, rest
        return proto, (url if proto in ("http", "https") else rest)
    return None, url


def is_local(url: str) -> bool:
    return split_protocol(url)[0] is None


@dataclass(frozen=True)
class Network:
    """Timeouts of http(s) shard reads (``data.connect_timeout``, ``data.read_timeout``) and retries
    of remote shard opens (``data.retries``): a server that never accepts, or accepts and never
    answers, fails in ``connect`` / ``read`` seconds per attempt instead of hanging; an object store
    that is down for a while (s3://, http(s)) is retried with backoff."""

    connect: float = 10.0
    read: float = 60.0
    retries: int = 5
    backoff: float = 1.0   # seconds before the first retry, doubling after each
    patient_buckets: bool = True   # the s3:// bucket check retries too (expand_urls)


_NETWORK = Network()


def configure_network(data_cfg, patient_buckets: bool = True) -> None:
    """Use ``data_cfg``'s network settings for every http(s) shard this process opens from now on
    (called by the preflight in the driver and by each reader actor). ``patient_buckets=False``:
    an s3:// endpoint that cannot be reached fails the bucket check at once (a new run's preflight:
    a misnamed endpoint is told in seconds)."""
    global _NETWORK
    _NETWORK = Network(connect=float(data_cfg.connect_timeout), read=float(data_cfg.read_timeout),
                       retries=int(data_cfg.retries), patient_buckets=patient_buckets)


def filesystem(proto: str):
    """The fsspec filesystem for a protocol (``split_protocol``'s); http(s) with the network
    timeouts of ``configure_network``."""
    if proto in ("http", "https"):
        import aiohttp  # lazy: ~0.1 s more for every importer of sdn_dist.data; only http(s) needs it
        # sock_connect bounds the TCP (and TLS) handshake; sock_read every wait for bytes, the
        # response headers included: a server that accepts and never answers fails after it.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=_NETWORK.connect,
                                        sock_read=_NETWORK.read)
        return fsspec.filesystem("http", client_kwargs={"timeout": timeout})
    return fsspec.filesystem(proto)


def network_problem(url: str, e: BaseException) -> str | None:
    """Which of the two timeouts (or what connection failure) is behind ``e``, in words naming
    ``url``; None when ``e`` is not a network failure (a 404, a corrupt tar ...)."""
    import aiohttp  # lazy, as in filesystem
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, aiohttp.ConnectionTimeoutError):
            return (f"shard {url}: connect timeout: the server did not accept a connection within "
                    f"{_NETWORK.connect:g} s (data.connect_timeout)")
        if isinstance(cur, (aiohttp.SocketTimeoutError, asyncio.TimeoutError)):
            return (f"shard {url}: read timeout: the server accepted the connection but sent "
                    f"nothing for {_NETWORK.read:g} s (data.read_timeout)")
        if isinstance(cur, aiohttp.ClientConnectionError):
            return f"shard {url}: cannot connect: {cur}"
        # an object store that is down or dropping connections (s3fs: botocore's errors), or a
        # connection refused / reset on the way
        if isinstance(cur, (ConnectionError, *_botocore_network_errors())):
            return f"shard {url}: cannot connect: {type(cur).__name__}: {cur}"
        cur = cur.__cause__ or cur.__context__
    return None


def _botocore_network_errors() -> tuple[type, ...]:
    try:
        import botocore.exceptions as bex
    except ImportError:   # no s3fs here: nothing of botocore's can be raised either
        return ()
    return bex.ConnectionError, bex.HTTPClientError


def _with_retries(url: str, fn: Callable):
    """``fn()``, retried with exponential backoff while it fails with a network problem; after the
    last attempt, DataError saying which problem and naming ``url``. Other errors pass through."""
    attempts = 1 + max(0, _NETWORK.retries)
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised when not the network
            why = network_problem(url, e)
            if why is None:
                raise
            if i + 1 == attempts:
                raise DataError(f"{why}; gave up after {attempts} attempt{'s' if attempts > 1 else ''} "
                                f"(data.retries={_NETWORK.retries})") from None
            time.sleep(_NETWORK.backoff * 2 ** i)


def _with_proto(proto: str, path: str) -> str:
    if proto in ("http", "https") or "://" in path:
        return path
    return f"{proto}://{path}"


SPLITS = ("train", "test")


def expand_urls(urls: str | Sequence[str], split: str | None = None) -> list[str]:
    """Expand a shard URL (or a list of them) into the ordered list of shard URLs.

    A directory gives all its ``*.tar`` files sorted, except that with ``split`` ("train" or
    "test") a directory that holds ``train-*``/``test-*`` shards gives only that split's, so
    that a directory named as training data never feeds its test shards to training (and says
    so on the ``sdn_dist`` log); a glob gives its sorted matches; a brace pattern
    (``train-{000000..000009}.tar``) its expansion (through ``braceexpand``, as webdataset does);
    anything else is taken as one shard. Lists are expanded element by element, in order.
    Raises DataError when a pattern matches nothing. Local results are plain paths.
    """
    if isinstance(urls, (list, tuple)):
        out: list[str] = []
        for u in urls:
            out += expand_urls(u, split)
        if not out:
            raise DataError("no shard URL given (empty list)")
        return out
    if not isinstance(urls, str) or not urls.strip():
        raise DataError("no shard URL given (set data.train / data.test or pass a URL)")
    out = []
    for part in braceexpand(urls.strip()):
        try:   # a missing bucket, refused credentials, no endpoint: said once, up front
            if _NETWORK.patient_buckets:   # an unreachable endpoint is waited for, as a shard open is
                _with_retries(urls.strip(), lambda: check_bucket(part, name=urls.strip(), network_errors=True))
            else:
                check_bucket(part, name=urls.strip())
        except UserError as e:
            raise DataError(str(e)) from None
        out += _expand_one(part, split)
    return out


_SPLITS_SAID: set[tuple[str, str]] = set()


def _split_of_directory(url: str, found: list[str], split: str | None) -> list[str]:
    """A directory's tars, narrowed to ``split``'s when it holds named splits."""
    if split is None:
        return found
    named = {s: [u for u in found if u.rstrip("/").rsplit("/", 1)[-1].startswith(f"{s}-")] for s in SPLITS}
    said = (url, split) in _SPLITS_SAID   # preflight and the data plan expand it too: said once
    _SPLITS_SAID.add((url, split))
    if not any(named.values()):
        if not said:
            log.info("%s: %d shards, no train-/test- split in their names: all of them used as %s data",
                     url, len(found), split)
        return found
    if not named[split]:
        raise DataError(f"directory {url} holds {' and '.join(f'{s}-*' for s in SPLITS if named[s])} "
                        f"shards but no {split}-* shards; name the {split} shards' URL")
    if not said:
        log.info("%s: its %d %s-* shards (of %d tars) used as %s data", url, len(named[split]), split,
                 len(found), split)
    return named[split]


def _expand_one(url: str, split: str | None = None) -> list[str]:
    proto, path = split_protocol(url)
    if proto is None:
        path = os.path.expanduser(path)
        if any(c in path for c in _GLOB_CHARS):
            found = sorted(p for p in _glob.glob(path) if os.path.isfile(p))
            if not found:
                raise DataError(f"no shards match {url}")
            return found
        if os.path.isdir(path):
            found = sorted(p for p in _glob.glob(os.path.join(_glob.escape(path), "*.tar")))
            if not found:
                raise DataError(f"directory {url} holds no *.tar shards")
            return _split_of_directory(url, found, split)
        return [path]
    try:
        fs = filesystem(proto)
        if "*" in path or (proto not in ("http", "https") and any(c in path for c in _GLOB_CHARS)):
            found = sorted(_with_proto(proto, p) for p in fs.glob(path))
            if not found:
                raise DataError(f"no shards match {url}")
            return found
        # A name ending in .tar is a shard: no listing request per brace-expanded shard on s3.
        if url.endswith("/") or (proto not in ("http", "https") and not path.endswith(TAR_EXTS)
                                 and fs.isdir(path)):
            found = sorted(_with_proto(proto, p) for p in fs.ls(path, detail=False)
                           if str(p).rstrip("/").endswith(".tar"))
            if not found:
                raise DataError(f"directory {url} holds no *.tar shards")
            return _split_of_directory(url, found, split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any backend failure is a bad URL for the user
        raise DataError(f"cannot list {url}: {type(e).__name__}: {e}") from None
    return [url]


# ----------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------

def open_shard(url: str):
    """Open a shard for binary reading. Returns (fileobj, seekable).

    Local files are opened directly (seekable: tar headers can be read without the data);
    remote ones through fsspec as a sequential stream (http: one streaming GET).
    A missing or unreadable shard raises DataError naming it.
    """
    proto, path = split_protocol(url)
    try:
        if proto is None:
            return open(path, "rb"), True
        fs = filesystem(proto)
        if proto in ("http", "https"):
            # A stream needs no size: given one, fsspec skips asking the server for it (a HEAD,
            # then a GET when that fails), which would double every timeout and turn a stalled
            # server into "file not found".
            return _with_retries(url, lambda: fs.open(path, "rb", block_size=0, size=-1)), False
        return _with_retries(url, lambda: fs.open(path, "rb")), False
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"shard {url} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"shard {url} is a directory, not a tar file") from None
    except PermissionError:
        raise DataError(f"shard {url} cannot be read (permission denied)") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"shard {url} cannot be opened: {type(e).__name__}: {e}") from None


class _TailStream(io.RawIOBase):
    """Sequential reader that remembers the last bytes read, to check the end-of-archive marker
    of a stream that cannot seek back."""

    def __init__(self, f, keep: int = 64 * 1024):
        self.f, self.keep, self.pos, self.tail = f, keep, 0, b""

    def readable(self):
        return True

    def read(self, n=-1):
        b = self.f.read(n)
        self.pos += len(b)
        self.tail = (self.tail + b)[-self.keep:]
        return b

    def readinto(self, buf):
        b = self.read(len(buf))
        buf[:len(b)] = b
        return len(b)

    def bytes_at(self, offset: int, n: int) -> bytes | None:
        start = self.pos - len(self.tail)
        if offset < start:
            return None
        return self.tail[offset - start: offset - start + n]


def _tar_error(url: str, e: BaseException) -> DataError:
    msg = (str(e).splitlines() or [type(e).__name__])[0]
    if "empty file" in str(e):
        return DataError(f"shard {url} is empty (0 bytes or no tar header), not a tar archive")
    if "could not be opened" in str(e) or "header" in msg or "checksum" in msg:
        return DataError(f"shard {url} is not a tar archive or is corrupt ({msg})")
    return DataError(f"shard {url} is truncated or corrupt ({msg})")


def _sample_members(tf: tarfile.TarFile):
    """(tarinfo, key, ext) for every member that belongs to a sample, in tar order."""
    for ti in tf:
        if not ti.isreg():
            continue
        name = ti.name
        base = name.rsplit("/", 1)[-1]
        if base.startswith("__") and base.endswith("__"):
            continue  # webdataset metadata members
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        yield ti, key, ext.lower()
        tf.members = []  # keep memory flat on long shards (webdataset does the same)


def iter_shard(url: str, start: int = 0, stop: int | None = None,
               want: Callable[[int], bool] | None = None,
               read_limits: dict[str, int] | None = None) -> Iterator[tuple[int, dict | None]]:
    """Yield ``(index, sample)`` for every sample ``start <= index < stop`` of one shard, in order.

    ``sample`` is webdataset's dict ``{"__key__", "__url__", ext: bytes, ...}`` when ``want(index)``
    (default: always), else None and the member data is not read (local shards skip it by seeking).
    Everything stays in memory; ``read_limits`` ({ext: bytes}) reads only the first bytes of
    those members (the rest is skipped unread). Raises DataError naming the shard when it is
    missing, not a tar, corrupt, or ends before ``stop``.
    """
    read_limits = read_limits or {}
    f, seekable = open_shard(url)
    index, key, cur = -1, None, None
    try:
        tf = tarfile.open(fileobj=f, mode="r:*" if seekable else "r|*")
        for ti, k, ext in _sample_members(tf):
            if k != key:
                if index >= start:
                    yield index, cur
                index, key, cur = index + 1, k, None
                if stop is not None and index >= stop:
                    return
                if index >= start and (want is None or want(index)):
                    cur = {"__key__": k, "__url__": url}
            if cur is not None:
                limit = read_limits.get(ext)
                if limit is None and ti.size > MAX_MEMBER_BYTES:
                    raise DataError(f"shard {url}: member {ti.name} is {ti.size} bytes, over the "
                                    f"{MAX_MEMBER_BYTES}-byte limit")
                cur[ext] = tf.extractfile(ti).read(-1 if limit is None else limit)
        if key is not None and index >= start:
            yield index, cur
        if stop is not None and index + 1 < stop:
            raise DataError(f"shard {url} ended after {index + 1} samples, expected {stop} "
                            "(truncated, or changed since it was counted)")
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        why = None if is_local(url) else network_problem(url, e)
        if why:   # a stall part-way through a stream: samples were yielded, so no retry here
            raise DataError(why) from None
        raise _tar_error(url, e) from None
    finally:
        f.close()


@dataclass
class ShardInfo:
    url: str
    samples: int
    extensions: collections.Counter = field(default_factory=collections.Counter)
    first_key: str | None = None


def scan_shard(url: str) -> ShardInfo:
    """Sample count and member extensions from the tar headers only, checking the archive is whole.

    Raises DataError naming the shard when it is missing, empty (0 bytes), not a tar, truncated
    (including a cut exactly between members: the end-of-archive marker must be there) or corrupt.
    A remote scan that stalls part-way is retried from the start (``data.retries``).
    """
    if is_local(url):
        return _scan_shard(url)
    return _with_retries(url, lambda: _scan_shard(url, network_errors=True))


def _scan_shard(url: str, network_errors: bool = False) -> ShardInfo:
    f, seekable = open_shard(url)
    src = f if seekable else _TailStream(f)
    info = ShardInfo(url, 0)
    key = None
    try:
        tf = tarfile.open(fileobj=src, mode="r:*" if seekable else "r|*")
        for ti, k, ext in _sample_members(tf):
            if k != key:
                info.samples += 1
                key = k
                if info.first_key is None:
                    info.first_key = k
            info.extensions[ext] += 1
        # tarfile stops silently at a cut between members; the end-of-archive zero block that
        # every writer puts there tells a whole archive from a truncated one.
        end, block = tf.offset, None
        if seekable:
            tf.fileobj.seek(end)
            block = tf.fileobj.read(512)
        elif getattr(tf.fileobj, "comptype", "tar") == "tar":
            block = src.bytes_at(end, 512)
        if block is not None and (len(block) < 512 or block.strip(b"\0")):
            raise DataError(f"shard {url} is truncated or corrupt (no end-of-archive marker "
                            f"after {info.samples} samples at byte {end})")
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if network_errors and network_problem(url, e):
            raise   # for _with_retries
        raise _tar_error(url, e) from None
    finally:
        f.close()
    return info


def count_samples(urls: str | Sequence[str]) -> int:
    """Total number of samples in the shards a URL expands to (tar headers only)."""
    return sum(shard_counts(expand_urls(urls)))


def shard_counts(urls: Sequence[str], threads: int = 8) -> list[int]:
    """Samples per shard, in the order given: from the shard index or img2dataset's stats files
    beside the tars where they still match the shards (see ``sdn_dist.data.index``), else from
    the tars' headers (remote shards a few at a time)."""
    from sdn_dist.data.index import count_shards   # lazy: index.py is built on this module
    return count_shards(urls, threads).counts


# ----------------------------------------------------------------------------------------------
# Inspection
# ----------------------------------------------------------------------------------------------

def inspect_shards(urls: str | Sequence[str], scan: bool = False) -> dict:
    """What ``sdn-dist shards inspect URL`` reports: counts, extensions, one example.

    Returns ``{"url", "shards", "samples", "per_shard": [{"url", "samples", "from"}],
    "counts_from": {"index"|"stats"|"tars": shards}, "stale": [urls], "count_seconds",
    "extensions": {ext: members}, "extensions_from": shards read, "example": {"key", "captions",
    "meta", "members"}}``. Counts come from the shard index (or img2dataset's stats) where it
    matches the shards, else from scanning the tar; ``scan`` reads every tar regardless (each
    checked whole, every member counted). A missing, empty, non-tar, truncated or sample-less
    shard that is scanned raises DataError naming it.
    """
    from sdn_dist.data.index import count_shards   # lazy: index.py is built on this module
    shard_list = expand_urls(urls)
    counted = count_shards(shard_list, use_index=not scan)
    for u, n in zip(shard_list, counted.counts):
        if n == 0:
            raise DataError(f"shard {u} is empty (a tar archive with no samples)")
    # Member extensions of the tars that were read; with counts from an index only the first
    # shard is read (for them and the example), so that inspecting a large bucket stays cheap.
    infos = list(counted.scanned.values()) or [scan_shard(shard_list[0])]
    ext = collections.Counter()
    for i in infos:
        ext.update(i.extensions)
    example = None
    for _, s in iter_shard(shard_list[0], 0, 1):
        if s is None:
            continue
        captions = []
        if "txt" in s:
            captions = [c.strip() for c in s["txt"].decode("utf-8", "replace").splitlines() if c.strip()]
        meta = None
        if "json" in s:
            try:
                meta = json.loads(s["json"])
            except ValueError:
                meta = "<invalid JSON>"
        example = {"key": s["__key__"], "captions": captions, "meta": meta,
                   "members": sorted(k for k in s if not k.startswith("__"))}
    return {
        "url": urls if isinstance(urls, str) else list(urls),
        "shards": len(shard_list),
        "samples": sum(counted.counts),
        "per_shard": [{"url": u, "samples": n, "from": f}
                      for u, n, f in zip(shard_list, counted.counts, counted.source)],
        "counts_from": counted.sources(),
        "stale": counted.stale,
        "count_seconds": round(counted.scan_seconds, 3),
        "extensions": dict(sorted(ext.items())),
        "extensions_from": len(infos),
        "example": example,
    }


def format_inspection(info: dict) -> str:
    """Human-readable form of :func:`inspect_shards` output."""
    lines = [f"{info['samples']} samples in {info['shards']} shard(s)"]
    for s in info["per_shard"][:10]:
        lines.append(f"  {s['url']}: {s['samples']}")
    if len(info["per_shard"]) > 10:
        lines.append(f"  ... {len(info['per_shard']) - 10} more")
    src = info.get("counts_from") or {}
    if set(src) - {"tars"}:
        lines.append("counts from " + ", ".join(f"{k}: {v}" for k, v in sorted(src.items()))
                     + (f" ({len(info['stale'])} stale index entries recounted)" if info.get("stale") else ""))
    read = info.get("extensions_from", info["shards"])
    lines.append(f"members{'' if read == info['shards'] else f' (of the {read} shard(s) read)'}: "
                 + ", ".join(f".{k} x{v}" for k, v in info["extensions"].items()))
    ex = info.get("example")
    if ex:
        lines.append(f"example {ex['key']}: {', '.join('.' + m for m in ex['members'])}")
        for c in ex["captions"][:3]:
            lines.append(f"  caption: {c}")
        if isinstance(ex.get("meta"), dict):
            attrs = ex["meta"].get("attributes")
            if attrs:
                lines.append("  attributes: " + ", ".join(f"{k}={v}" for k, v in attrs.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# webdataset integration
# ----------------------------------------------------------------------------------------------

def _fsspec_gopen(url, mode="rb", bufsize=8192, **kw):
    if mode[0] == "r":
        return open_shard(url)[0]
    return fsspec.open(url, mode).open()


def register_fsspec_gopen(schemes: Sequence[str] = ("http", "https", "s3", "gs", "gcs", "az", "abfs")) -> None:
    """Make webdataset's ``gopen`` (used by ``wds.WebDataset``, ``TarWriter`` on URLs) open these
    schemes through fsspec instead of shelling out to curl / gsutil."""
    for s in schemes:
        gopen.gopen_schemes[s] = _fsspec_gopen


format_inspect = format_inspection  # short alias
