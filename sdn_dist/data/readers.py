"""Ray data actors: read, decode and embed this rank's share of the shards, ahead of the trainer.

Each training rank owns ``data.readers`` ShardReader actors. The run's one global sample stream
(see ``sdn_dist.data.pipeline.RankStream``: deterministic, each sample once per epoch, the same
order at every world size) is cut into micro-batches, and rank ``r`` of ``W`` takes every ``W``-th
one (global micro-batch ``r + W*i`` is its ``i``-th); reader ``j`` of ``R`` produces the rank's
micro-batches ``i`` with ``i % R == j``. Each call to a reader returns its next
``data.reader_chunk`` micro-batches (Ray's per-call cost is most of a reader's CPU); the rank keeps
at least ``data.prefetch`` micro-batches asked for ahead, so decoding overlaps training, batches
arrive in stream order, and readers can be scaled apart from the trainers. A restart, on any number of ranks,
begins at the checkpoint's global sample position.
"""

from __future__ import annotations

import logging
import collections
import dataclasses
import os
import resource
import sys
import time

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sdn_dist.config import DataConfig, ModelConfig, TextConfig
from sdn_dist.data.pipeline import RankStream, sample_caps
from sdn_dist.data.index import count_shards, list_ahead, scan_note
from sdn_dist.data.shards import configure_network, expand_urls
from sdn_dist.data.text import build_text_encoder, encoder_from_record
from sdn_dist.errors import ConfigError, UserError

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux VmHWM; elsewhere getrusage's ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def run_at_raylet_priority() -> None:
    """Undo Ray's demotion of its worker processes to niceness 15 (``RAY_worker_niceness``, meant
    to keep its own daemons responsive), for every thread of this process (Linux keeps niceness
    per thread; threads started later inherit their creator's).

    At niceness 15 every ordinary process on a shared machine runs first: on the 2-core demo
    machine under other jobs' load the trainer then lost a quarter to a third of its speed
    (docs/performance.md). The raylet's niceness is the one the user started Ray with (the
    driver's, under the embedded Ray). Lowering niceness needs CAP_SYS_NICE (root, or the
    capability in a container); without it nothing changes.
    """
    try:
        target = os.getpriority(os.PRIO_PROCESS, os.getppid())
        tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
        for tid in tids:
            if os.getpriority(os.PRIO_PROCESS, tid) > target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
    except (OSError, AttributeError):   # not permitted, a thread gone meanwhile, or not this OS
        pass


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What every reader of a run needs, resolved once by the driver: the shard list and counts
    (from the shard index beside the tars, else their headers, read once), the data section, the model's image size and the text encoder's
    record (the one description it is rebuilt from, once per process)."""

    urls: list[str]
    counts: list[int]
    seed: int
    image_size: int
    data: DataConfig
    text: dict
    text_dim: int
    text_stats: dict | None = None    # model.text_norm = standardize: text_statistics()

    @classmethod
    def build(cls, data: DataConfig, text: TextConfig, model: ModelConfig, seed: int) -> "DataSpec":
        """From the run's ``data``, ``text`` and ``model`` sections: expands and counts ``data.train``,
        builds the text encoder once."""
        if not data.train:
            raise ConfigError("data.train is empty: give training shards, e.g. --set data.train=shards/synth "
                              "(make some with `sdn-dist shards synth --out shards/synth`)")
        list_ahead(data.train)    # one listing serves the expansion and the index's checks
        urls = expand_urls(data.train, split="train")
        counted = count_shards(urls)
        note = scan_note(counted)
        if note:    # no index (or a stale one): say what the count cost and how to skip it
            log.warning(note)
        counts = counted.counts
        if sum(counts) < data.batch_size:
            raise UserError(f"data.train={data.train!r} holds {sum(counts)} samples, fewer than one batch ({data.batch_size})")
        encoder = build_text_encoder(text)
        stats = (text_statistics(urls, counts, data, model.image_size, seed, encoder)
                 if model.text_norm == "standardize" else None)
        return cls(urls=urls, counts=counts, seed=seed, image_size=model.image_size,
                   data=data, text=encoder.record(), text_dim=encoder.dim, text_stats=stats)


TEXT_STATISTICS_SAMPLES = 1024


def text_statistics(urls: list[str], counts: list[int], data: DataConfig, image_size: int, seed: int,
                    encoder) -> dict:
    """model.text_norm = standardize: the mean embedding of the captions of the first
    TEXT_STATISTICS_SAMPLES samples of the training stream (rank 0 of 1, the run's seed and
    caption choice) and their standard deviation around it (one number: the root mean square
    over samples and components). Deterministic: every driver of a run computes the same."""
    stream = RankStream(urls, counts, 0, 1, seed, data.shuffle, image_size=image_size,
                        text_encoder=encoder, caption=data.caption, strict=data.strict,
                        shuffle_buffer=data.shuffle_buffer, **sample_caps(data))
    n = min(TEXT_STATISTICS_SAMPLES, sum(counts))
    rows = [b["text"] for b in stream.iter_samples(0, batch_size=256, stop_sample=n, uint8=True)]
    text = torch.cat(rows).double() if rows else torch.zeros(0)
    if len(text) < 2:
        raise UserError(f"data.train={data.train!r}: model.text_norm=standardize needs the captions of at "
                        f"least 2 readable samples, found {len(text)}")
    mean = text.mean(0)
    std = float((text - mean).pow(2).mean().sqrt())
    if not std > 0:
        raise UserError(f"data.train={data.train!r}: the first {len(text)} captions all have the same "
                        f"embedding; model.text_norm=standardize cannot scale by their spread (0)")
    return {"mean": mean.float().tolist(), "std": std}


@dataclasses.dataclass
class Batch:
    """One micro-batch of a rank's stream, as a reader actor delivers it.

    ``image`` uint8 [b,S,S,3] as decoded (a quarter of the bytes of the float batch through Ray's
    object store; the trainer converts it, ``loop.prepare_batch``); ``text`` float32 [b,D] (b <= the
    micro-batch: bad samples are skipped, b may be 0); ``index`` the stream position of its first
    slot; ``skipped`` the reader's cumulative skip counts by reason."""

    image: np.ndarray
    text: np.ndarray | None
    captions: list[str]
    index: int
    skipped: dict[str, int]
    decode_seconds: float
    rss_peak_bytes: int
    node_id: str = ""                # the Ray node of the reader that decoded it

    def __len__(self) -> int:
        return len(self.captions)


def take_batches(it, stream: RankStream, k: int, node_id: str = "") -> list[Batch]:
    """The next ``k`` micro-batches of a reader's stream iterator ``it`` (the reader's own
    consecutive ones: the rank's micro-batches ``j, j+R, j+2R, ...``), each a :class:`Batch` with
    the reader's skip counts as they stood after it (so that a consumer sees the same counts at
    every chunk size)."""
    out = []
    for _ in range(k):
        t = time.time()
        b = next(it)
        out.append(Batch(image=b["image"].numpy(), text=None if b["text"] is None else np.asarray(b["text"]),
                         captions=b["captions"], index=b["index"], skipped=stream.skips.as_dict(),
                         decode_seconds=time.time() - t, rss_peak_bytes=0, node_id=node_id))
    rss = peak_rss_bytes()        # one /proc read per call: the peak only grows
    for b in out:
        b.rss_peak_bytes = rss
    return out


@ray.remote(num_cpus=0)
class ShardReader:
    def __init__(self, spec: DataSpec, rank: int, world_size: int, micro_batch: int,
                 reader: int, n_readers: int, start_sample: int):
        run_at_raylet_priority()
        # Decoding is single-threaded by design: every core a reader takes is one a trainer loses.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        configure_network(spec.data)
        self.stream = RankStream(spec.urls, spec.counts, rank=rank, world_size=world_size, seed=spec.seed,
                                 shuffle=spec.data.shuffle, image_size=spec.image_size,
                                 text_encoder=encoder_from_record(spec.text), caption=spec.data.caption,
                                 strict=spec.data.strict, shuffle_buffer=spec.data.shuffle_buffer,
                                 keep_in_memory=spec.data.keep_in_memory, cache_bytes=spec.data.cache_bytes,
                                 **sample_caps(spec.data))
        self.it = self.stream.iter_samples(start_sample=start_sample, worker=reader, num_workers=n_readers,
                                           batch_size=micro_batch, uint8=True)
        self.node_id = ray.get_runtime_context().get_node_id()

    def next(self, k: int = 1) -> list[Batch]:
        """The reader's next ``k`` micro-batches, in one call: the call, pickling and object-store
        put are most of a reader's CPU (docs/performance.md), paid once per ``k``."""
        return take_batches(self.it, self.stream, k, self.node_id)


class ChunkedFeed:
    """A rank's micro-batches in stream order from readers that each return their next ``chunk``
    micro-batches per call, with the skip counts, peak RSS and nodes they report: everything
    :class:`DataFeed` does but the Ray calls (tests drive it with plain streams).

    Rank micro-batch ``i`` is reader ``i % R``'s; call ``c`` of reader ``j`` holds the rank's
    micro-batches ``(c*chunk + t)*R + j`` for ``t < chunk``. Calls are issued in the order they
    are needed (reader 0, 1, ..., R-1, then each reader's next call) whenever fewer than
    ``ahead = max(prefetch, chunk*R)`` micro-batches are asked for and not yet returned (at least
    one call per reader, so none is asked only once it is needed): at most ``ahead + chunk - 1``
    micro-batches are held or in flight. ``call(j)`` starts reader ``j``'s next call, ``get(handle)``
    waits for its list of batches."""

    def __init__(self, n_readers: int, chunk: int, prefetch: int, call, get):
        self.n, self.chunk, self.call, self.get = n_readers, chunk, call, get
        self.ahead = max(prefetch, chunk * n_readers)
        self.calls = 0                    # calls issued (reader calls % n)
        self.requested = 0                # micro-batches asked for
        self.served = 0                   # micro-batches returned by next()
        self.pending = [collections.deque() for _ in range(n_readers)]   # per reader: calls in flight
        self.held = [collections.deque() for _ in range(n_readers)]      # per reader: batches got
        self.skipped: dict[str, int] = {}
        self.rss_peak_bytes = 0           # the largest peak RSS any of this rank's readers reported
        self._per_reader_skips: dict[int, dict] = {}
        self.node_ids: list[str] = []     # the nodes this rank's batches were decoded on (its own, by affinity)
        self._fill()

    def _fill(self) -> None:
        while self.requested - self.served < self.ahead:
            j = self.calls % self.n
            self.pending[j].append(self.call(j))
            self.calls += 1
            self.requested += self.chunk

    def next(self) -> Batch:
        j = self.served % self.n
        if not self.held[j]:
            self.held[j].extend(self.get(self.pending[j].popleft()))
        b = self.held[j].popleft()
        self.served += 1
        self._fill()
        self._per_reader_skips[j] = b.skipped
        self.rss_peak_bytes = max(self.rss_peak_bytes, b.rss_peak_bytes)
        if b.node_id not in self.node_ids:
            self.node_ids.append(b.node_id)
        total: dict[str, int] = collections.Counter()
        for s in self._per_reader_skips.values():
            total.update(s)
        self.skipped = dict(total)
        return b


class DataFeed(ChunkedFeed):
    """Trainer-side view of a rank's reader actors: ``next()`` returns the next micro-batch.

    ``start_sample`` is the global stream position (``TrainState.data_position``, the same on
    every rank); each ``next()`` advances it by ``slots``: this rank's micro-batch and the other
    ranks' beside it. Each reader call returns ``data.reader_chunk`` of the reader's micro-batches,
    kept in stream order by :class:`ChunkedFeed`. A reader's
    UserError (bad data under data.strict, an epoch with no usable sample) is raised here as
    itself, one line (``training/failures.py`` then stops the run instead of retrying it)."""

    def __init__(self, spec: DataSpec, rank: int, world_size: int, micro_batch: int, start_sample: int):
        n, chunk = spec.data.readers, spec.data.reader_chunk
        self.micro_batch = micro_batch   # this rank's stream slots per next(), good or bad
        self.slots = micro_batch * world_size   # global slots per next() (TrainState.data_position)
        self.readers = [ShardReader.options(scheduling_strategy=_on_this_node()).remote(
            spec, rank, world_size, micro_batch, j, n, start_sample) for j in range(n)]
        self.wait_seconds = 0.0
        super().__init__(n, chunk, spec.data.prefetch, lambda j: self.readers[j].next.remote(chunk), self._wait)

    def _wait(self, ref) -> list[Batch]:
        t = time.time()
        try:
            bs = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if not isinstance(e.cause, UserError):
                raise
            raise type(e.cause)(str(e.cause)) from None
        self.wait_seconds += time.time() - t
        return bs

    def close(self) -> None:
        for r in self.readers:
            ray.kill(r)


def _on_this_node():
    """Readers run on their training worker's node: decoded batches never cross the network."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
