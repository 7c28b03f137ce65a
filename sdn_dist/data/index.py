"""Shard indexes: per-shard sample counts kept beside the tars, so that start-up reads no tar.

    sdn-dist shards index s3://bucket/laion/      # counts once, writes s3://bucket/laion/shardindex.json
    from sdn_dist.data.index import count_shards, write_index
    counted = count_shards(urls)                  # counted.counts, counted.source ("index"|"stats"|"tars")

The exactly-once epoch plan needs every shard's exact sample count. Without an index that is a
full read of every remote tar before the first step (and at every resume). Where the counts come
from, first match wins, per shard:

1. ``shardindex.json`` in the shard's directory: webdataset's ``wids`` shard-list JSON
   (``widsindex create`` writes the same layout, under the same default name)::

       {"__kind__": "wids-shard-index-v1", "wids_version": 1,
        "shardlist": [{"url": "train-000000.tar", "nsamples": 500, "filesize": 1843200,
                       "etag": "\\"9b2c...\\""}, ...]}

   One file per directory, listing every split's shards there; ``url`` is relative to the
   index's directory (as wids resolves it; a ``base`` key, or absolute URLs, are honoured too).
   Beside ``nsamples`` and ``filesize`` an entry keeps what the store identifies a version of
   the object by: ``etag`` on object stores that give one (S3, GCS), ``mtime`` for local files.
   An entry is used only while the shard's size (and that identity, where the entry and the
   store both have one) still match; otherwise the shard is counted again from its tar.
   The name does not end in ``.tar``: no directory listing takes it for a shard.
2. img2dataset's ``NNNNN_stats.json`` beside ``NNNNN.tar`` (its ``successes`` is the number of
   samples written to that tar), on stores that can be listed.
3. The tar itself, read as before (``shards.scan_shard``), a few at a time; the caller is told
   how long that took and the command that writes an index.

Written by every writer of shards (``data/writer.py: shard_writer``, so ``shards synth`` and
``shards convert ...``) and by ``sdn-dist shards index URL`` for shards made elsewhere.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from braceexpand import braceexpand

from sdn_dist import fsio
from sdn_dist.data.shards import TAR_EXTS, filesystem, expand_urls, is_local, scan_shard, split_protocol
from sdn_dist.errors import DataError, UserError
from sdn_dist.fsio import check_bucket

INDEX_NAME = "shardindex.json"
KIND = "wids-shard-index-v1"
STATS_SUFFIX = "_stats.json"


@dataclass(frozen=True)
class Stat:
    """What the store says of one object now: its size and, where it has one, a version identity."""

    size: int
    etag: str | None = None
    mtime: float | None = None


@dataclass
class Counted:
    """Per-shard counts in the order asked, where each came from, and what was found stale."""

    urls: list[str]
    counts: list[int]
    source: list[str]                       # "index" | "stats" | "tars", per shard
    stale: list[str] = field(default_factory=list)     # urls whose index entry no longer matched
    stats: dict[str, Stat] = field(default_factory=dict)
    scanned: dict = field(default_factory=dict)         # url -> shards.ShardInfo of the tars read
    scan_seconds: float = 0.0

    def sources(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.source:
            out[s] = out.get(s, 0) + 1
        return out


# ----------------------------------------------------------------------------------------------
# Where a shard lives
# ----------------------------------------------------------------------------------------------

def split_dir(url: str) -> tuple[str, str]:
    """'s3://b/d/x.tar' -> ('s3://b/d', 'x.tar'); 'x.tar' -> ('.', 'x.tar')."""
    head, sep, name = url.rpartition("/")
    if not sep:
        return ".", url
    return (head or "/"), name


def _dir_path(dir_url: str) -> str:
    """A directory URL as a comparable path: protocol and trailing slash dropped."""
    proto, path = split_protocol(dir_url)
    if proto in ("http", "https"):
        path = path.split("://", 1)[1]
    elif proto is None:
        path = os.path.abspath(os.path.expanduser(path))
    return path.rstrip("/")


def stat_dir(dir_url: str, names: Sequence[str]) -> dict[str, Stat] | None:
    """{file name: Stat} for ``names`` (and the index / stats files) in ``dir_url`` as the store
    lists it now; None for stores that cannot list (http: each shard is asked for its size)."""
    proto, path = split_protocol(dir_url)
    if proto is None:
        out = {}
        for n in list(names) + [INDEX_NAME]:
            try:
                st = os.stat(os.path.join(path, n))
            except OSError:
                continue
            out[n] = Stat(st.st_size, mtime=st.st_mtime)
        # img2dataset's stats files, only where there is no index (local checks cost nothing)
        for n in names:
            s = _stats_name(n)
            if s and os.path.exists(os.path.join(path, s)):
                out[s] = Stat(0)
        return out
    if proto in ("http", "https"):
        return None
    fs = filesystem(proto)
    if not _listed_lately(dir_url):
        # A fresh listing: a cached one (s3fs keeps them for the life of the filesystem object)
        # may predate a shard's rewrite, and then a stale index entry would look current.
        fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as e:  # noqa: BLE001 - any backend failure is a bad URL for the user
        raise DataError(f"cannot list {dir_url}: {type(e).__name__}: {e}") from None
    out = {}
    for e in entries:
        if e.get("type") == "directory":
            continue
        etag = e.get("ETag") or e.get("etag")
        out[str(e["name"]).rstrip("/").rsplit("/", 1)[-1]] = Stat(int(e.get("size") or 0),
                                                                  etag=str(etag) if etag else None)
    return out


# Directories this process listed afresh, and when (list_ahead).
_LISTED: dict[str, float] = {}
LISTING_REUSE_SECONDS = 60.0


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _listed_lately(dir_url: str) -> bool:
    return time.time() - _LISTED.get(dir_url.rstrip("/"), -1e9) < LISTING_REUSE_SECONDS


def list_ahead(spec: str | Sequence[str]) -> None:
    """List afresh, once, the object-store directories a shard URL (pattern) names, before it is
    expanded. fsspec keeps the listing, so the expansion (a glob, a directory) and the index's
    size checks are all served by this one listing instead of one listing each: at 10,000 shards
    on S3 each listing is 10 requests and seconds. A listing made here is reused for
    LISTING_REUSE_SECONDS (the preflight's, moments before DataSpec.build's), then made again."""
    parts = [p for u in ([spec] if isinstance(spec, str) else spec) for p in braceexpand(str(u).strip())]
    dirs: list[str] = []
    for part in parts:
        proto, _ = split_protocol(part)
        if proto is None or proto in ("http", "https"):
            continue
        head, _, name = part.rstrip("/").rpartition("/")
        if part.endswith("/") or not (name.endswith(TAR_EXTS) or _has_glob(name)):
            head = part.rstrip("/")    # the URL names a directory
        if not _has_glob(head.split("://", 1)[-1]) and head not in dirs:
            dirs.append(head)
    for d in dirs:
        if _listed_lately(d):
            continue
        try:   # a missing bucket, bad credentials, no endpoint: for the expansion to say, at once
            check_bucket(d)
        except UserError:
            return
        proto, path = split_protocol(d)
        fs = filesystem(proto)
        fs.invalidate_cache(path)
        try:
            fs.ls(path, detail=True)
        except Exception:  # noqa: BLE001 - the expansion right after says what is wrong, naming the URL
            continue
        _LISTED[d.rstrip("/")] = time.time()


def _stat_each(urls: Sequence[str], threads: int) -> dict[str, Stat]:
    """Sizes asked one object at a time (http: a HEAD each), for stores that cannot list."""
    def one(u):
        proto, path = split_protocol(u)
        try:
            info = filesystem(proto).info(path)
        except Exception:  # noqa: BLE001 - missing or unreachable: counted from the tar, which says why
            return u, None
        size = info.get("size")
        return u, (Stat(int(size), etag=info.get("ETag") or info.get("etag")) if size is not None else None)
    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as ex:
        return {u: s for u, s in ex.map(one, urls) if s is not None}


def _stats_name(shard_name: str) -> str | None:
    return shard_name[:-len(".tar")] + STATS_SUFFIX if shard_name.endswith(".tar") else None


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def _read_bytes(url: str) -> bytes | None:
    proto, path = split_protocol(url)
    try:
        if proto is None:
            with open(path, "rb") as f:
                return f.read()
        return filesystem(proto).cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"shard index {url} cannot be read ({e})") from None


def parse_index(data: bytes, index_url: str) -> dict[str, dict]:
    """The entries of a shard index that describe shards in its own directory, by file name.
    Anything malformed is a DataError naming the file, the key and the value."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"shard index {index_url} is not valid JSON ({e}); rewrite it with "
                        f"`sdn-dist shards index {split_dir(index_url)[0]}`") from None
    if not isinstance(doc, dict):
        raise DataError(f"shard index {index_url}: expected a JSON object, got {type(doc).__name__}")
    kind = doc.get("__kind__", KIND)
    if kind != KIND:
        raise DataError(f"shard index {index_url}: __kind__ is {kind!r}, expected {KIND!r}")
    shards = doc.get("shardlist")
    if not isinstance(shards, list):
        raise DataError(f"shard index {index_url}: shardlist is {_show(shards)}, expected a list of "
                        "{\"url\", \"nsamples\", \"filesize\"} objects")
    here = _dir_path(split_dir(index_url)[0])
    base = doc.get("base")
    if base is not None and not isinstance(base, str):
        raise DataError(f"shard index {index_url}: base is {_show(base)}, expected a URL string")
    out: dict[str, dict] = {}
    for i, e in enumerate(shards):
        where = f"shard index {index_url}: shardlist[{i}]"
        if not isinstance(e, dict):
            raise DataError(f"{where} is {_show(e)}, expected an object")
        url = e.get("url")
        if not isinstance(url, str) or not url:
            raise DataError(f"{where}.url is {_show(url)}, expected a shard URL")
        for key in ("nsamples", "filesize"):
            v = e.get(key)
            if key == "filesize" and v is None:
                continue    # wids allows it; such an entry is never trusted (below)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DataError(f"{where}.{key} is {_show(v)}, expected a non-negative integer")
        full = url if ("://" in url or url.startswith("/") or base is None) else base.rstrip("/") + "/" + url
        d, name = split_dir(full)
        if d == "." or _dir_path(d) == here:
            out[name] = e
    return out


def _show(v) -> str:
    s = json.dumps(v) if not isinstance(v, (bytes, bytearray)) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def read_index(dir_url: str, listing: dict[str, Stat] | None) -> dict[str, dict]:
    """``dir_url``'s index entries by file name ({} when there is none; no request when the
    listing shows none)."""
    if listing is not None and INDEX_NAME not in listing:
        return {}
    url = posixpath.join(dir_url, INDEX_NAME) if dir_url != "." else INDEX_NAME
    data = _read_bytes(url)
    return {} if data is None else parse_index(data, url)


def _read_stats(dir_url: str, names: Sequence[str], listing: dict[str, Stat]) -> dict[str, int]:
    """{shard name: successes} from the img2dataset stats files the listing shows."""
    want = {n: _stats_name(n) for n in names if _stats_name(n) in listing}
    if not want:
        return {}
    proto, path = split_protocol(dir_url)
    paths = {n: posixpath.join(path, s) for n, s in want.items()}
    if proto is None:
        blobs = {n: _read_bytes(p) for n, p in paths.items()}
    else:   # one concurrent batch (fsspec's async cat), not a request at a time
        got = filesystem(proto).cat(list(paths.values()), on_error="return")
        blobs = {n: got.get(p) for n, p in paths.items()}
    out = {}
    for n, b in blobs.items():
        url = posixpath.join(dir_url, want[n])
        if b is None or isinstance(b, BaseException):
            continue
        try:
            doc = json.loads(b)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"img2dataset stats {url} is not valid JSON ({e})") from None
        v = doc.get("successes") if isinstance(doc, dict) else None
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DataError(f"img2dataset stats {url}: successes is {_show(v)}, expected a "
                            "non-negative integer (the samples written to its tar)")
        out[n] = v
    return out


def fresh(entry: dict, st: Stat | None) -> bool:
    """Whether an index entry still describes the object the store holds now."""
    if st is None or entry.get("filesize") != st.size:
        return False
    if entry.get("etag") and st.etag and entry["etag"] != st.etag:
        return False
    if entry.get("mtime") is not None and st.mtime is not None and entry["mtime"] != st.mtime:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------

def count_shards(urls: Sequence[str], threads: int = 8, *, use_index: bool = True) -> Counted:
    """Samples per shard, in the order given: from each directory's index, else img2dataset's
    stats files, else the tars' headers (remote ones ``threads`` at a time)."""
    urls = list(urls)
    counts: list[int | None] = [None] * len(urls)
    source = ["tars"] * len(urls)
    result = Counted(urls, [], source)
    by_dir: dict[str, list[int]] = {}
    for i, u in enumerate(urls):
        by_dir.setdefault(split_dir(u)[0], []).append(i)
    for d, idx in by_dir.items():
        names = [split_dir(urls[i])[1] for i in idx]
        listing = stat_dir(d, names)
        entries = read_index(d, listing) if use_index else {}
        if listing is None:   # http: a HEAD for each shard the index has an entry to check against
            per = _stat_each([urls[i] for i, n in zip(idx, names) if n in entries], threads)
            stats = {split_dir(u)[1]: s for u, s in per.items()}
        else:
            stats = listing
        for i, n in zip(idx, names):
            if n in stats:
                result.stats[urls[i]] = stats[n]
        if not use_index:
            continue
        for i, n in zip(idx, names):
            e = entries.get(n)
            if e is None:
                continue
            if fresh(e, stats.get(n)):
                counts[i], source[i] = int(e["nsamples"]), "index"
            else:
                result.stale.append(urls[i])
        if listing is not None:
            todo = [n for i, n in zip(idx, names) if counts[i] is None]
            found = _read_stats(d, todo, listing)
            for i, n in zip(idx, names):
                if counts[i] is None and n in found:
                    counts[i], source[i] = found[n], "stats"
    todo = [i for i, c in enumerate(counts) if c is None]
    if todo:
        t = time.time()
        scan = [urls[i] for i in todo]
        if all(is_local(u) for u in scan) or len(scan) < 2:
            got = [scan_shard(u) for u in scan]
        else:
            with ThreadPoolExecutor(min(threads, len(scan))) as ex:
                got = list(ex.map(scan_shard, scan))
        for i, info in zip(todo, got):
            counts[i] = info.samples
            result.scanned[urls[i]] = info
        result.scan_seconds = time.time() - t
    result.counts = [int(c) for c in counts]
    return result


def scan_note(counted: Counted) -> str | None:
    """One line for a count that had to read tars: how many, how long, and how to skip it."""
    n = counted.source.count("tars")
    if not n:
        return None
    dirs = sorted({split_dir(u)[0] for u, s in zip(counted.urls, counted.source) if s == "tars"})
    stale = f", {len(counted.stale)} of them because their index entry no longer matched" if counted.stale else ""
    return (f"counted the samples of {n} shard{'s' if n > 1 else ''} from the tars in "
            f"{counted.scan_seconds:.2f} s{stale}; to start without reading them, write an index: "
            f"sdn-dist shards index {dirs[0]}" + (f" (and {len(dirs) - 1} more directories)" if len(dirs) > 1 else ""))


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def entry(name: str, nsamples: int, st: Stat) -> dict:
    e: dict = {"url": name, "nsamples": int(nsamples), "filesize": int(st.size)}
    if st.etag:
        e["etag"] = st.etag
    if st.mtime is not None:
        e["mtime"] = st.mtime
    return e


def write_index(dir_url: str, entries: dict[str, dict]) -> str:
    """Merge ``entries`` (by file name) into ``dir_url``'s index and write it back; existing
    entries whose file is gone are removed. Returns its URL."""
    old: dict[str, dict] = {}
    try:
        old = read_index(dir_url, None)
    except DataError:
        pass    # a broken index is replaced, not merged
    present = stat_dir(dir_url, list(old))
    keep = set(old) if present is None else set(present)
    merged = {n: {**e, "url": n} for n, e in old.items() if n in keep}
    merged.update(entries)
    doc = {"__kind__": KIND, "wids_version": 1,
           "shardlist": [merged[n] for n in sorted(merged)]}
    url = posixpath.join(dir_url, INDEX_NAME) if dir_url != "." else INDEX_NAME
    # one entry per line: a 40,000-shard index stays readable and diffable (about 100 bytes each)
    text = ('{"__kind__": "%s", "wids_version": 1, "shardlist": [\n' % KIND
            + ",\n".join(json.dumps(e, sort_keys=True) for e in doc["shardlist"]) + "\n]}\n")
    fsio.atomic_write(url, text)
    return url


def index_shards(url: str | Sequence[str], threads: int = 8) -> dict:
    """``sdn-dist shards index URL``: count the shards a URL expands to (entries still fresh in
    an existing index and img2dataset stats are reused) and write each directory's index."""
    t = time.time()
    urls = expand_urls(url)
    counted = count_shards(urls, threads)
    by_dir: dict[str, dict[str, dict]] = {}
    for u, c in zip(urls, counted.counts):
        st = counted.stats.get(u)
        if st is None:
            raise DataError(f"shard {u}: the store gives no size for it, so an index entry "
                            "could not be checked later")
        d, n = split_dir(u)
        by_dir.setdefault(d, {})[n] = entry(n, c, st)
    written = [write_index(d, e) for d, e in by_dir.items()]
    return {"indexes": written, "shards": len(urls), "samples": sum(counted.counts),
            "from": counted.sources(), "stale": counted.stale, "seconds": round(time.time() - t, 2)}
