"""Deterministic, resumable, exactly-once reading of caption shards into micro-batches.

    from sdn_dist.data.pipeline import iter_batches
    for batch in iter_batches("shards/synth/train-{000000..000003}.tar", image_size=64,
                              batch_size=16, text_encoder=enc, epochs=1):
        batch["image"]   # float [B,3,S,S] in [0,1]

The design the trainer relies on:

* The order is global: one sample sequence per epoch whatever the number of ranks, so a resume
  on another worker count continues it exactly. :func:`plan_epoch` is pure: from the shard sample
  counts, the epoch and the seed it gives the epoch's ``(shard_index, start, stop)`` sample ranges
  (the shards in a per-epoch permutation). A *position* counts samples of that global sequence as
  they sit in the tars, good or bad, over epochs 0, 1, 2, ... (epoch ``e`` starts at ``e * total``),
  so positions never depend on decoding or on the world size.
* :class:`RankStream` reads that sequence, each range optionally shuffled by a shuffle buffer
  seeded by ``(seed, epoch, range)``, never by the rank. Rank ``r`` of ``W`` takes every ``W``-th
  micro-batch of it: micro-batch ``i`` covers positions ``[start + i*B, start + (i+1)*B)`` and is
  rank ``i % W``'s. A training step of ``W`` ranks x ``grad_accum`` micro-batches so always covers
  the same ``data.batch_size`` positions at any world size; only their split over ranks differs.
* ``RankStream.iter_samples(start_sample, worker, num_workers, batch_size)`` resumes at an absolute
  position (skipped shards are not opened, and the skipped part of a shard is not decoded). Loader
  worker ``w`` of ``n`` yields the rank's micro-batches ``i`` with ``(i // W) % n == w``, so a torch
  DataLoader (round-robin over workers) returns them in exactly the single-process order. Resume
  offset after each rank drew ``k`` micro-batches: ``start + k*W*B``.
* Bad samples are skipped and counted by reason (:class:`SkipCounter`), so a batch can be short,
  even empty; its ``index`` and the positions of every later batch are unaffected.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sdn_dist.config import MAX_CAPTION_CHARS, MAX_IMAGE_PIXELS
from sdn_dist.errors import DataError
from sdn_dist.data.shards import expand_urls, iter_shard, shard_counts

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")
EMB_EXT = "emb.npy"

# Reasons a sample is skipped: the label values of sdn_data_samples_skipped_total{reason}.
SKIP_REASONS = (
    "missing_image",      # no KEY.png / KEY.jpg ...
    "not_image",          # image member whose bytes are not an image format PIL knows
    "bad_image",          # an image that does not decode (truncated, corrupt)
    "image_too_large",    # more pixels than data.max_image_pixels (never decoded)
    "missing_caption",    # no KEY.txt
    "empty_caption",      # KEY.txt with no non-blank line
    "bad_caption",        # KEY.txt not UTF-8 or binary
    "bad_meta",           # KEY.json not a JSON object
    "missing_embedding",  # text.encoder=precomputed and no KEY.emb.npy
    "bad_embedding",      # not a plain .npy (pickles refused), wrong shape / rows / dim
    "nan_embedding",      # NaN or inf in the embedding row
)


class SkipCounter(collections.Counter):
    """Skipped samples by reason (a dict reason -> count). Export with ``as_dict()``."""

    def add(self, reason: str, n: int = 1) -> None:
        self[reason] += n

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.items()) if v}

    @property
    def total(self) -> int:
        return int(sum(self.values()))


def seed_int(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (the same in every process and Python run,
    unlike ``hash()``)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


# ----------------------------------------------------------------------------------------------
# Planning (pure)
# ----------------------------------------------------------------------------------------------

def shard_order(n_shards: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    order = list(range(n_shards))
    if shuffle:
        random.Random(seed_int(seed, "shards", epoch)).shuffle(order)
    return order


def plan_epoch(counts: Sequence[int], epoch: int, seed: int,
               shuffle: bool) -> list[tuple[int, int, int]]:
    """The ``(shard_index, start, stop)`` sample ranges of ``epoch``'s global sequence, in order.

    Shards are visited in a per-epoch permutation (seeded by ``(seed, epoch)``; identity when
    ``shuffle`` is False), each whole; empty shards have no range. Every sample appears in exactly
    one range. The number of ranks plays no part: they split the sequence by micro-batch
    (:meth:`RankStream.iter_samples`).
    """
    return [(k, 0, int(counts[k])) for k in shard_order(len(counts), epoch, seed, shuffle) if counts[k]]


def buffer_order(n: int, buffer: int, rng: random.Random) -> list[int]:
    """The output order of a shuffle buffer of ``buffer`` items over inputs 0..n-1 (webdataset's
    algorithm run on indices). Output j never needs an input later than j + buffer - 1, so
    reading sequentially holds at most ~``buffer`` samples."""
    out, buf = [], []
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            out.append(buf.pop())
    rng.shuffle(buf)
    return out + buf


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def decode_image(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Image bytes -> uint8 [size, size, 3] RGB (alpha composited on white, antialiased resize of
    the whole image, no crop). Raises _Skip('not_image' | 'bad_image' | 'image_too_large').

    ``max_pixels`` bounds the decoded size: the header is read first (``Image.open`` is lazy) and
    an image over the cap is refused before a single pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _Skip("not_image", "not a recognised image format") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types on hostile input
        raise _Skip("bad_image", f"{type(e).__name__}: {e}") from None
    try:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much cheaper
        w, h = img.size                  # after draft: the size that will really be decoded
        if max_pixels is not None and w * h > max_pixels:
            raise _Skip("image_too_large", f"{w}x{h} = {w * h} pixels, over data.max_image_pixels={max_pixels}")
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit grayscale -> 8-bit
            a = np.asarray(img, dtype=np.float32)
            a = a / 257.0 if a.max(initial=0) > 255 else a
            img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)
    except _Skip:
        raise
    except Exception as e:  # noqa: BLE001
        raise _Skip("bad_image", f"{type(e).__name__}: {e}") from None


# KEY.txt is read up to this many captions' worth of bytes at the length cap (4 bytes: the longest
# UTF-8 character): a 100 MB caption file costs a reader no more than a normal one.
CAPTION_LINES_READ = 16


def caption_bytes_cap(max_chars: int) -> int:
    """Bytes of KEY.txt read for ``data.max_caption_chars`` (the rest is never read)."""
    return CAPTION_LINES_READ * 4 * max_chars


def decode_captions(data: bytes, max_chars: int | None = None) -> list[str]:
    """KEY.txt bytes -> non-blank stripped lines, each cut to ``max_chars`` characters (before any
    tokeniser sees it). Raises _Skip('bad_caption' | 'empty_caption')."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # A member cut at caption_bytes_cap() may end inside a character: drop that partial one.
        cut = max_chars is not None and len(data) == caption_bytes_cap(max_chars)
        if not cut or e.start < len(data) - 3 or e.reason != "unexpected end of data":
            raise _Skip("bad_caption", "not UTF-8") from None
        text = data[:e.start].decode("utf-8")
    if "\0" in text or sum(1 for c in text if ord(c) < 32 and c not in "\t\r\n") > len(text) // 10:
        raise _Skip("bad_caption", "binary data")
    lines = [ln.strip()[:max_chars].strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise _Skip("empty_caption", "no caption line")
    return lines


def as_float_images(image: torch.Tensor) -> torch.Tensor:
    """Decoded uint8 [b,S,S,3] -> float [b,3,S,S] in [0,1]: a channels-last view, no copy of the
    layout (``.contiguous()`` makes it NCHW). The batches of every reader and stream come out of it."""
    return image.permute(0, 3, 1, 2).float().div_(255.0)


def decode_embedding(data: bytes, n_captions: int, dim: int) -> np.ndarray:
    """KEY.emb.npy bytes -> float32 [n_captions, dim]; never unpickles."""
    try:
        emb = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise _Skip("bad_embedding", f"not a plain .npy array ({type(e).__name__})") from None
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] != n_captions or emb.dtype.kind not in "fiu":
        raise _Skip("bad_embedding", f"shape {emb.shape} {emb.dtype}, expected ({n_captions}, {dim}) floats")
    return emb.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# The rank stream
# ----------------------------------------------------------------------------------------------

class RankStream:
    """One rank's share of the infinite, deterministic global sample stream (see the module
    docstring): its positions are global, it yields the micro-batches that are its own.

    Args:
        urls, counts: the shards and their sample counts (``shard_counts(urls)``), same order.
        rank, world_size: this rank among the data-parallel trainers: it takes micro-batches
            ``i`` with ``i % world_size == rank`` of the global stream.
        seed, shuffle: shard permutation, shuffle buffer and caption choice seeds.
        image_size: output side in pixels.
        text_encoder: a :class:`~sdn_dist.data.text.TextEncoder` (``precomputed`` reads KEY.emb.npy)
            or None (batches carry ``text=None``).
        caption: "random" (seeded by (seed, epoch, key): same choice on every rerun) or "first".
        shuffle_buffer: samples in the within-range shuffle buffer (1 = no shuffle within shards).
        strict: a bad sample raises DataError naming shard and key instead of being skipped.
        skips: the SkipCounter to add skips to (default: a new one, ``self.skips``).
        max_caption_chars, max_image_pixels: the per-sample memory bounds (``data.*``); None = none.
        keep_in_memory: keep every sample read (its tar members), so that later epochs do not
            read the shards again: the same samples in the same order, for data sets that fit in
            memory and are read many times (``data.keep_in_memory``: `sdn-dist teacher train`
            reads the demo's 4,000 images twelve times).
        cache_bytes: keep decoded samples (the uint8 [S,S,3] image, captions, meta and stored
            embedding rows, keyed by shard URL and sample key), the first ones decoded until they
            fill this many bytes, so that later epochs decode them no more (``data.cache_bytes``;
            0 = off). Decoding is deterministic, so the batches are the same with or without it.

    A reader that goes through a whole epoch of its share without one usable sample raises
    DataError with the skip counts by reason: a run cannot train on nothing.
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, *,
                 image_size: int = 64, text_encoder=None, caption: str = "random",
                 shuffle_buffer: int = 64, strict: bool = False, skips: SkipCounter | None = None,
                 max_caption_chars: int | None = MAX_CAPTION_CHARS, max_image_pixels: int | None = MAX_IMAGE_PIXELS,
                 keep_in_memory: bool = False, cache_bytes: int = 0):
        if len(urls) != len(counts):
            raise ValueError(f"{len(urls)} urls but {len(counts)} counts")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if caption not in ("random", "first"):
            raise ValueError(f"caption must be 'random' or 'first', got {caption!r}")
        self.urls, self.counts = list(urls), [int(c) for c in counts]
        self.total = sum(self.counts)
        if self.total == 0:
            raise DataError(f"no samples in {len(self.urls)} shard(s) ({', '.join(self.urls[:3])}...)")
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.image_size, self.text_encoder, self.caption = image_size, text_encoder, caption
        self.shuffle_buffer, self.strict = max(1, shuffle_buffer), strict
        self.skips = skips if skips is not None else SkipCounter()
        self.max_caption_chars, self.max_image_pixels = max_caption_chars, max_image_pixels
        self._read_limits = {"txt": caption_bytes_cap(max_caption_chars)} if max_caption_chars else None
        self._use_emb = bool(getattr(text_encoder, "precomputed", False))
        self._plan_cache: tuple[int, list] | None = None
        # keep_in_memory: (shard index, sample index) -> raw sample
        self._raw: dict[tuple[int, int], dict] | None = {} if keep_in_memory else None
        # cache_bytes: (url, key) -> decoded sample (captions, meta, stored rows, image), filled
        # until the next one would not fit
        self._cache: dict[tuple[str, str], dict] | None = {} if cache_bytes > 0 else None
        self.cache_bytes, self.cached_bytes = int(cache_bytes), 0

    # -- positions ------------------------------------------------------------------------------
    def epoch_start(self, epoch: int) -> int:
        """Absolute stream position of ``epoch``'s first sample."""
        return epoch * self.total

    def locate(self, position: int) -> tuple[int, int]:
        """Absolute position -> (epoch, offset within that epoch)."""
        return divmod(position, self.total)

    def ranges(self, epoch: int) -> list[tuple[int, int, int]]:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, plan_epoch(self.counts, epoch, self.seed, self.shuffle))
        return self._plan_cache[1]

    # -- reading --------------------------------------------------------------------------------
    def _range_order(self, epoch: int, ri: int, n: int) -> list[int]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            return list(range(n))
        # The 0 stands where the rank was when each rank had a plan of its own: the global order is
        # the one rank 0 of 1 read then, so a single-worker run and its checkpoints read as before.
        rng = random.Random(seed_int(self.seed, "buffer", epoch, 0, ri))
        return buffer_order(n, self.shuffle_buffer, rng)

    def iter_raw(self, start: int = 0, stop: int | None = None,
                 want=None) -> Iterator[tuple[int, int, dict]]:
        """``(position, epoch, raw webdataset sample)`` for the positions in [start, stop) with
        ``want(position)`` (default all), in stream order; nothing else is decoded."""
        epoch, _ = self.locate(start)
        while stop is None or self.epoch_start(epoch) < stop:
            base = self.epoch_start(epoch)
            for ri, (k, a, b) in enumerate(self.ranges(epoch)):
                n = b - a
                lo, hi = max(0, start - base), n if stop is None else min(n, stop - base)
                if lo < hi:
                    yield from self._iter_range(epoch, ri, k, a, n, base, lo, hi, want)
                base += n
                if stop is not None and base >= stop:
                    return
            epoch += 1

    def _iter_range(self, epoch, ri, k, a, n, base, lo, hi, want):
        order = self._range_order(epoch, ri, n)
        need = [j for j in range(lo, hi) if want is None or want(base + j)]
        if not need:
            return
        inputs = {order[j] for j in need}
        if self._raw is not None and all((k, a + i) in self._raw for i in inputs):
            for j in need:
                yield base + j, epoch, self._raw[(k, a + order[j])]
            return
        held: dict[int, dict] = {}
        it = iter(need)
        j = next(it)
        # keep_in_memory keeps the whole range once its shard is open, the other ranks' samples
        # too: which of them are this rank's changes every epoch, and a later epoch then never
        # opens the shard again (reading unwanted members costs little beside parsing the headers).
        lo_i, hi_i = (0, n) if self._raw is not None else (min(inputs), max(inputs) + 1)
        for idx, raw in iter_shard(self.urls[k], a + lo_i, a + hi_i, read_limits=self._read_limits,
                                   want=None if self._raw is not None else lambda i: (i - a) in inputs):
            if raw is None:
                continue
            if self._raw is not None:
                self._raw[(k, idx)] = raw
            if idx - a not in inputs:
                continue
            held[idx - a] = raw
            while j is not None and order[j] in held:
                yield base + j, epoch, held.pop(order[j])
                j = next(it, None)

    def iter_samples(self, start_sample: int = 0, worker: int = 0, num_workers: int = 1,
                     batch_size: int = 1, stop_sample: int | None = None,
                     uint8: bool = False) -> Iterator[dict]:
        """This rank's micro-batches of the global stream from absolute position ``start_sample``.

        Batch ``i`` covers positions ``[start + i*B, start + (i+1)*B)`` (clipped at ``stop_sample``)
        and is rank ``i % world_size``'s; this call yields the rank's batches ``i`` with
        ``(i // world_size) % num_workers == worker``. Every rank must be given the same
        ``start_sample`` (the global ``TrainState.data_position``). Each batch is a dict:
        ``image`` float [b,3,S,S] in [0,1]; ``text`` float [b,D] or None; ``captions`` list[str];
        ``meta`` list[dict]; ``key`` list[str]; ``epoch`` list[int]; ``index`` (the absolute position
        of the batch's first slot); ``size`` (positions covered, = B except at ``stop_sample``);
        ``skipped`` {reason: n} for the bad samples in this batch's positions. ``b`` <= B when
        samples were skipped (b may be 0). ``uint8``: ``image`` is the decoded uint8 [b,S,S,3] instead
        (a quarter of the bytes to ship; :func:`as_float_images` makes the float batch from it).
        """
        if batch_size < 1 or not 0 <= worker < num_workers:
            raise ValueError("need batch_size >= 1 and 0 <= worker < num_workers")
        start, bs = int(start_sample), int(batch_size)
        # Rank r's loader worker w: every (world x workers)-th batch of the global stream.
        nw, part = self.world_size * int(num_workers), self.rank + self.world_size * worker

        def want(p: int) -> bool:
            return ((p - start) // bs) % nw == part

        cur, items, skipped = None, [], SkipCounter()
        # This reader's tally of the epoch it is in: a whole epoch (begun at its first position)
        # with reads and not one usable sample means the run would train on nothing.
        ep, ep_whole, ep_good, ep_skips = None, False, 0, SkipCounter()
        for pos, epoch, raw in self.iter_raw(start, stop_sample, want):
            if epoch != ep:
                self._check_epoch(ep, ep_whole, ep_good, ep_skips)
                ep, ep_whole, ep_good, ep_skips = epoch, start <= self.epoch_start(epoch), 0, SkipCounter()
            i = (pos - start) // bs
            if cur is not None and i != cur:
                yield self._collate(start + cur * bs, bs, items, skipped, stop_sample, uint8)
                items, skipped = [], SkipCounter()
            cur = i
            s = self._decode(raw, epoch, skipped, ep_skips)
            if s is not None:
                items.append(s)
                ep_good += 1
        if ep is not None and stop_sample is not None and self.epoch_start(ep + 1) <= stop_sample:
            self._check_epoch(ep, ep_whole, ep_good, ep_skips)
        if cur is not None:
            yield self._collate(start + cur * bs, bs, items, skipped, stop_sample, uint8)

    def _check_epoch(self, epoch, whole: bool, good: int, skips: SkipCounter) -> None:
        if epoch is None or not whole or good or not skips.total:
            return
        reasons = ", ".join(f"{k}={v}" for k, v in skips.as_dict().items())
        shards = self.urls[0] + (f" ... ({len(self.urls)} shards)" if len(self.urls) > 1 else "")
        raise DataError(f"no usable sample in a whole epoch: all {skips.total} samples read in epoch "
                        f"{epoch} (rank {self.rank} of {self.world_size}) from {shards} were skipped "
                        f"({reasons}); `sdn-dist shards inspect` shows what the shards hold")

    def _decode(self, raw: dict, epoch: int, *counters: SkipCounter) -> dict | None:
        try:
            return self.decode(raw, epoch)
        except _Skip as s:
            if self.strict:
                raise DataError(f"shard {raw['__url__']} sample {raw['__key__']}: {s.reason} "
                                f"({s.detail})") from None
            for c in (self.skips, *counters):
                c.add(s.reason)
            return None

    def decode(self, raw: dict, epoch: int = 0) -> dict:
        """One raw webdataset sample -> the decoded sample; raises _Skip(reason, detail). With
        ``cache_bytes``, a kept sample's captions, meta, stored embedding rows and image come from
        the cache: only the epoch's caption choice is made again (the same checks, in the same
        order, so the same samples are skipped for the same reasons)."""
        at = (raw.get("__url__", ""), raw["__key__"])
        part = (self._cache.get(at) if self._cache is not None else None) or self._parse(raw)
        captions, rows, key = part["captions"], part["rows"], raw["__key__"]
        c = 0 if self.caption == "first" else seed_int(self.seed, "caption", epoch, key) % len(captions)
        emb = None if rows is None else rows[c]
        if emb is not None and not np.isfinite(emb).all():
            if self._use_emb:
                raise _Skip("nan_embedding", "NaN or inf in the embedding")
            emb = None                     # a stored row that is no good: encode the caption
        if part["image"] is None:          # not from the cache: decode, and keep it if it fits
            part["image"] = decode_image(raw[part["img_ext"]], self.image_size, self.max_image_pixels)
            self._keep(at, part)
        return {"image": part["image"], "caption": captions[c], "emb": emb, "meta": part["meta"],
                "key": key, "epoch": epoch}

    def _parse(self, raw: dict) -> dict:
        """The part of decoding that does not depend on the epoch, but the image."""
        img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if img_ext is None:
            raise _Skip("missing_image", "no image member")
        if "txt" not in raw:
            raise _Skip("missing_caption", "no .txt member")
        captions = decode_captions(raw["txt"], self.max_caption_chars)
        meta: Any = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                raise _Skip("bad_meta", "KEY.json is not a JSON object")
        rows = None
        if self._use_emb:
            if EMB_EXT not in raw:
                raise _Skip("missing_embedding", "no .emb.npy member")
            rows = decode_embedding(raw[EMB_EXT], len(captions), self.text_encoder.dim)
        elif EMB_EXT in raw and self._stored_rows_match(meta.get("emb_encoder")):
            # Rows this very encoder computed when the shard was written: no need to encode.
            try:
                rows = decode_embedding(raw[EMB_EXT], len(captions), self.text_encoder.dim)
            except _Skip:
                rows = None
        return {"img_ext": img_ext, "captions": captions, "meta": meta, "rows": rows, "image": None}

    def _keep(self, at: tuple[str, str], part: dict) -> None:
        """Cache a decoded sample while the cache has room (first come; never evicted)."""
        if self._cache is None:
            return
        n = (part["image"].nbytes + (0 if part["rows"] is None else part["rows"].nbytes)
             + sum(len(c.encode()) for c in part["captions"]))
        if self.cached_bytes + n <= self.cache_bytes:
            part["image"].flags.writeable = False     # shared by every later epoch's batches
            self._cache[at] = part
            self.cached_bytes += n

    def _stored_rows_match(self, record) -> bool:
        matches = getattr(self.text_encoder, "matches", None)
        return matches is not None and record is not None and matches(record)

    def _collate(self, index: int, bs: int, items: list[dict], skipped: SkipCounter,
                 stop: int | None, uint8: bool = False) -> dict:
        s = self.image_size
        if items:
            image = torch.from_numpy(np.stack([it["image"] for it in items]))      # uint8 [b,S,S,3]
        else:
            image = torch.zeros(0, s, s, 3, dtype=torch.uint8)
        if not uint8:
            image = as_float_images(image).contiguous()
        captions = [it["caption"] for it in items]
        text = None
        if self.text_encoder is not None:
            arr = np.zeros((len(items), self.text_encoder.dim), np.float32)
            todo = [i for i, it in enumerate(items) if it["emb"] is None]
            for i, it in enumerate(items):
                if it["emb"] is not None:
                    arr[i] = it["emb"]
            if todo:  # never for precomputed: those samples were skipped without a row
                arr[todo] = self.text_encoder.encode([captions[i] for i in todo])
            text = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        return {
            "image": image, "text": text, "captions": captions,
            "meta": [it["meta"] for it in items], "key": [it["key"] for it in items],
            "epoch": [it["epoch"] for it in items], "index": index,
            "size": bs if stop is None else max(0, min(bs, stop - index)),
            "skipped": skipped.as_dict(),
        }


# ----------------------------------------------------------------------------------------------
# Torch and convenience wrappers
# ----------------------------------------------------------------------------------------------

class ShardDataset(torch.utils.data.IterableDataset):
    """A RankStream as a torch IterableDataset yielding whole micro-batches.

    Use with ``DataLoader(ds, batch_size=None, num_workers=n)`` (or :func:`make_loader`): worker w
    yields the rank's batches number w, w + n, ... and the loader's round-robin puts them back in
    stream order.
    Skips happen in the worker processes: aggregate each batch's ``skipped`` in the consumer.
    """

    def __init__(self, stream: RankStream, start_sample: int = 0, batch_size: int = 1,
                 stop_sample: int | None = None):
        super().__init__()
        self.stream, self.start, self.batch_size, self.stop = stream, start_sample, batch_size, stop_sample

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.stream.iter_samples(self.start, w, n, self.batch_size, self.stop)


def _worker_init(_):
    torch.set_num_threads(1)  # on small machines every loader thread is a core the trainer loses


def make_loader(stream: RankStream, *, start_sample: int = 0, batch_size: int,
                num_workers: int = 0, stop_sample: int | None = None, prefetch: int = 2):
    """A torch DataLoader over a RankStream; batches come back in exact stream order."""
    ds = ShardDataset(stream, start_sample, batch_size, stop_sample)
    kw = dict(prefetch_factor=prefetch, worker_init_fn=_worker_init) if num_workers else {}
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, **kw)


def build_rank_stream(data_cfg, *, split: str = "train", image_size: int, rank: int = 0,
                      world_size: int = 1, seed: int = 0, text_encoder=None,
                      counts: Sequence[int] | None = None, skips: SkipCounter | None = None) -> RankStream:
    """The RankStream for ``data_cfg.train`` (or ``.test``) with the config's shuffle, buffer,
    caption and strict settings. Pass ``counts`` when they were computed once for all ranks."""
    url = getattr(data_cfg, split)
    urls = expand_urls(url, split=split)
    counts = list(counts) if counts is not None else shard_counts(urls)
    return RankStream(urls, counts, rank, world_size, seed, data_cfg.shuffle,
                      image_size=image_size, text_encoder=text_encoder, caption=data_cfg.caption,
                      shuffle_buffer=data_cfg.shuffle_buffer, strict=data_cfg.strict, skips=skips,
                      **sample_caps(data_cfg))


def sample_caps(data_cfg) -> dict:
    """The per-sample memory bounds of a DataConfig, as RankStream / iter_batches keywords."""
    return {"max_caption_chars": data_cfg.max_caption_chars, "max_image_pixels": data_cfg.max_image_pixels}


def iter_batches(urls, *, image_size: int, batch_size: int, text_encoder=None, shuffle: bool = True,
                 seed: int = 0, epochs: int | None = None, caption: str = "random", rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 64, strict: bool = False,
                 skips: SkipCounter | None = None, max_caption_chars: int | None = MAX_CAPTION_CHARS,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS, keep_in_memory: bool = False,
                 cache_bytes: int = 0) -> Iterator[dict]:
    """Micro-batches (the dict of :meth:`RankStream.iter_samples`) in one process.

    ``epochs=None`` never ends; ``epochs=k`` stops after k epochs of the global stream (this
    rank's micro-batches of them; the last batch may be short). ``shuffle=False, epochs=1`` reads every sample once, in shard order (eval).
    ``keep_in_memory``, ``cache_bytes``: see :class:`RankStream`.
    """
    shard_list = expand_urls(urls)
    stream = RankStream(shard_list, shard_counts(shard_list), rank, world_size, seed, shuffle,
                        image_size=image_size, text_encoder=text_encoder, caption=caption,
                        shuffle_buffer=shuffle_buffer, strict=strict, skips=skips,
                        max_caption_chars=max_caption_chars, max_image_pixels=max_image_pixels,
                        keep_in_memory=keep_in_memory, cache_bytes=cache_bytes)
    stop = None if epochs is None else stream.epoch_start(epochs)
    yield from stream.iter_samples(0, 0, 1, batch_size, stop)


def decode_problem(url: str, data_cfg, *, image_size: int, text_encoder=None) -> tuple[str, str, str] | None:
    """Read the first sample of shard ``url`` and decode it exactly as a reader with ``data_cfg``
    would: ``(key, skip reason, detail)`` if it would be skipped, else None. The preflight's look
    at the data, in well under a second for a local shard."""
    stream = RankStream([url], [1], shuffle=False, image_size=image_size, text_encoder=text_encoder,
                        caption="first", **sample_caps(data_cfg))
    for _, raw in iter_shard(url, read_limits=stream._read_limits):
        try:
            stream.decode(raw)
        except _Skip as s:
            return raw["__key__"], s.reason, s.detail
        break   # one sample is all it takes; an empty shard is for the sample count to report
    return None
