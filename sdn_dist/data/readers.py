"""Ray data actors: read, decode and embed this rank's share of the shards, ahead of the trainer.

Each training rank owns ``data.readers`` ShardReader actors. The rank's sample stream (see
``sdn_dist.data.pipeline.RankStream``: a deterministic, exactly-once-per-epoch split of the shards
over ranks) is cut into micro-batches; reader ``j`` of ``R`` produces micro-batches ``i`` with
``i % R == j``. The rank asks reader ``i % R`` for micro-batch ``i`` and keeps ``data.prefetch``
requests in flight, so decoding overlaps training, batches arrive in stream order, and readers can
be scaled apart from the trainers. A restart begins at the checkpoint's sample offset.
"""

from __future__ import annotations

import collections
import os
import time

import numpy as np
import ray
import torch


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux VmHWM; elsewhere getrusage's ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys
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


@ray.remote(num_cpus=0)
class ShardReader:
    def __init__(self, spec: dict, reader: int, n_readers: int, start_sample: int):
        run_at_raylet_priority()
        # Decoding is single-threaded by design: every core a reader takes is one a trainer loses.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        from sdn_dist.data.pipeline import RankStream
        from sdn_dist.data.text import build_text_encoder
        from sdn_dist.config import DataConfig, TextConfig

        data_cfg = DataConfig.model_validate(spec["data"])
        encoder = build_text_encoder(TextConfig.model_validate(spec["text"]))
        stream = RankStream(spec["urls"], spec["counts"], rank=spec["rank"], world_size=spec["world_size"],
                            seed=spec["seed"], shuffle=data_cfg.shuffle, image_size=spec["image_size"],
                            text_encoder=encoder, caption=data_cfg.caption, strict=data_cfg.strict,
                            shuffle_buffer=data_cfg.shuffle_buffer)
        self.stream = stream
        self.it = stream.iter_samples(start_sample=start_sample, worker=reader, num_workers=n_readers,
                                      batch_size=spec["micro_batch"])

    def next(self) -> dict:
        t = time.time()
        b = next(self.it)
        return {"image": b["image"].numpy(), "text": None if b["text"] is None else np.asarray(b["text"]),
                "captions": b["captions"], "index": b["index"], "epoch": b["epoch"],
                "skipped": self.stream.skips.as_dict(), "decode_seconds": time.time() - t,
                "rss_peak_bytes": peak_rss_bytes()}


class DataFeed:
    """Trainer-side view of a rank's reader actors: ``next()`` returns the next micro-batch."""

    def __init__(self, spec: dict, start_sample: int, readers: int, prefetch: int):
        self.readers = [ShardReader.remote(spec, j, readers, start_sample) for j in range(readers)]
        self.n = readers
        self.i = 0
        self.pending: collections.deque = collections.deque()
        self.prefetch = max(prefetch, readers)
        self.wait_seconds = 0.0
        self.skipped: dict[str, int] = {}
        self.rss_peak_bytes = 0           # the largest peak RSS any of this rank's readers reported
        self._per_reader_skips: dict[int, dict] = {}
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.prefetch:
            j = self.i % self.n
            self.pending.append((j, self.readers[j].next.remote()))
            self.i += 1

    def next(self) -> dict:
        j, ref = self.pending.popleft()
        t = time.time()
        b = ray.get(ref)
        self.wait_seconds += time.time() - t
        self._fill()
        self._per_reader_skips[j] = b["skipped"]
        self.rss_peak_bytes = max(self.rss_peak_bytes, b.get("rss_peak_bytes", 0))
        total: dict[str, int] = collections.Counter()
        for s in self._per_reader_skips.values():
            total.update(s)
        self.skipped = dict(total)
        return b

    def close(self) -> None:
        for r in self.readers:
            ray.kill(r)
