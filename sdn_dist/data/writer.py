"""Writing caption shards with webdataset's ShardWriter (img2dataset layout).

    with shard_writer("shards/mine", "train", per_shard=1000) as sink:
        sink.add("000000001", png_bytes, "png", ["a caption"], {"label": 3})
    sink.urls   # ['shards/mine/train-000000.tar', ...]

One sample: ``KEY.png|jpg`` (image bytes), ``KEY.txt`` (captions, one per line), ``KEY.json``
(metadata), optionally ``KEY.emb.npy`` (float32 [n_captions, D], one row per caption line).
Tars are reproducible: fixed mtime, fixed owner, members in sorted order (webdataset's TarWriter).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import fsspec
import numpy as np
import webdataset as wds

from sdn_dist.errors import DataError
from sdn_dist.data.index import entry as index_entry, stat_dir, write_index
from sdn_dist.data.shards import is_local, split_protocol

TAR_MTIME = 946684800  # 2000-01-01: a fixed member time makes the same samples give the same bytes


def clean_caption(text: str) -> str:
    """One caption line as stored and read back: whitespace runs (line breaks too) -> one space."""
    return " ".join(text.split())


def sample_record(key: str, image: bytes, image_ext: str, captions: list[str], meta: dict,
                  emb: np.ndarray | None = None) -> dict:
    """A webdataset sample dict of bytes. ``key`` must not contain '.' (webdataset splits the
    file name at the first dot) nor '/'."""
    if "." in key or "/" in key or not key:
        raise ValueError(f"bad sample key {key!r}: no '.', no '/', not empty")
    lines = [clean_caption(c) for c in captions]
    if not lines or not all(lines):
        raise ValueError(f"sample {key}: every caption must be non-empty")
    rec = {"__key__": key, image_ext: image, "txt": "\n".join(lines).encode("utf-8"),
           "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}
    if emb is not None:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(lines):
            raise ValueError(f"sample {key}: embedding shape {emb.shape}, need ({len(lines)}, D)")
        buf = io.BytesIO()
        np.save(buf, emb, allow_pickle=False)
        rec["emb.npy"] = buf.getvalue()
    return rec


class _Sink:
    """What :func:`shard_writer` yields: ``add(...)`` one sample, ``urls``, ``count``."""

    def __init__(self, write, embed=None, chunk: int = 256):
        self._write, self.embed, self.chunk = write, embed, chunk
        self._pending: list[tuple] = []
        self.urls: list[str] = []
        self.count = 0

    def add(self, key: str, image: bytes, image_ext: str, captions: list[str], meta: dict,
            emb: np.ndarray | None = None) -> None:
        """Write one sample (see :func:`sample_record`). With an ``embed`` encoder and no
        ``emb``, the captions are encoded (in chunks) into ``KEY.emb.npy`` and
        ``meta["emb_encoder"]`` records the encoder, so readers with the same encoder skip it."""
        if self.embed is not None and emb is None:
            self._pending.append((key, image, image_ext, captions, meta))
            if len(self._pending) >= self.chunk:
                self.flush()
            return
        self._write(sample_record(key, image, image_ext, captions, meta, emb))
        self.count += 1

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        texts = [clean_caption(c) for p in pending for c in p[3]]
        rows = np.asarray(self.embed.encode(texts), np.float32)
        record = self.embed.record()
        i = 0
        for key, image, ext, captions, meta in pending:
            n = len(captions)
            self._write(sample_record(key, image, ext, captions, {**meta, "emb_encoder": record},
                                      rows[i:i + n]))
            self.count += 1
            i += n


@contextlib.contextmanager
def shard_writer(out: str, prefix: str, per_shard: int = 1000, embed=None):
    """Write ``out/{prefix}-000000.tar ...`` with wds.ShardWriter, ``per_shard`` samples each.

    ``out`` may be a local directory (created) or any fsspec URL. Stale local shards of the same
    prefix from an earlier, larger run are removed so the directory holds exactly this data set.
    Nothing is written for zero samples. ``embed``: a TextEncoder whose caption embeddings are
    stored as ``KEY.emb.npy`` (see ``_Sink.add``).
    """
    if per_shard < 1:
        raise DataError(f"--per-shard must be >= 1, got {per_shard}")
    urls: list[str] = []
    files: dict[str, object] = {}
    local = is_local(out)
    base = split_protocol(out)[1] if local else out.rstrip("/")
    if local:
        try:
            os.makedirs(base, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create output directory {out}: {e}") from None

    def opener(fname):
        urls.append(fname)
        if local:
            return fname  # a path: TarWriter opens (and closes) it itself
        f = fsspec.open(fname, "wb").open()
        files[fname] = f
        return f

    def post(fname):
        f = files.pop(fname, None)
        if f is not None:
            f.close()  # TarWriter leaves streams it did not open to us

    writer = None

    counts: dict[str, int] = {}

    def write(rec):
        nonlocal writer
        if writer is None:  # opened on the first sample: nothing is written for zero samples
            writer = wds.ShardWriter(f"{base}/{prefix}-%06d.tar", maxcount=per_shard, verbose=0,
                                     opener=opener, post=post, encoder=False, mtime=TAR_MTIME)
        writer.write(rec)
        counts[urls[-1]] = counts.get(urls[-1], 0) + 1   # the shard ShardWriter is filling

    sink = _Sink(write, embed)
    sink.urls = urls
    try:
        yield sink
        sink.flush()
    finally:
        if writer is not None:
            writer.close()
    if local:
        pat = re.compile(re.escape(prefix) + r"-(\d{6})\.tar$")
        for name in os.listdir(base):
            m = pat.match(name)
            if m and os.path.join(base, name) not in urls:
                os.remove(os.path.join(base, name))
    _index_written(base if local else out.rstrip("/"), urls, counts)


def _index_written(out: str, urls: list[str], counts: dict[str, int]) -> None:
    """Record the shards just written in ``out``'s shard index (entries of files no longer
    there are dropped), so that training starts without reading them (``sdn_dist.data.index``)."""
    names = [u.rsplit("/", 1)[-1] for u in urls]
    stats = stat_dir(out, names) or {}
    write_index(out, {n: index_entry(n, counts.get(u, 0), stats[n]) for n, u in zip(names, urls) if n in stats})
