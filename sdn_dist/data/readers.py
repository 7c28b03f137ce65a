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
        from sdn_dist.data.pipeline import RankStream, sample_caps
        from sdn_dist.data.shards import configure_network
        from sdn_dist.data.text import build_text_encoder
        from sdn_dist.config import DataConfig, TextConfig

        data_cfg = DataConfig.model_validate(spec["data"])
        configure_network(data_cfg)
        encoder = build_text_encoder(TextConfig.model_validate(spec["text"]))
        stream = RankStream(spec["urls"], spec["counts"], rank=spec["rank"], world_size=spec["world_size"],
                            seed=spec["seed"], shuffle=data_cfg.shuffle, image_size=spec["image_size"],
                            text_encoder=encoder, caption=data_cfg.caption, strict=data_cfg.strict,
                            shuffle_buffer=data_cfg.shuffle_buffer, **sample_caps(data_cfg))
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


# Ray's internal key-value store (the GCS) holds the first user error (bad data) a reader of this
# job raised. Ray Train restarts a failed worker group up to ray.max_failures times, which helps
# with a lost node, never with bad data (and a restart from a later checkpoint could even step
# past the bad part and "finish"): every restarted feed of the job re-raises it at once instead.
_FATAL_KEY = b"sdn-dist-data-user-error"


def _job_key() -> bytes:
    return _FATAL_KEY + b"-" + ray.get_runtime_context().get_job_id().encode()


def _raise_recorded_user_error() -> None:
    from ray.experimental import internal_kv

    from sdn_dist.errors import DataError
    msg = internal_kv._internal_kv_get(_job_key())
    if msg:
        raise DataError(msg.decode())


def _user_error(err: BaseException):
    """The UserError a reader raised, out of Ray's wrapper (whose message is the remote traceback)."""
    from sdn_dist.errors import UserError
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, UserError) else None


class DataFeed:
    """Trainer-side view of a rank's reader actors: ``next()`` returns the next micro-batch.

    A reader's UserError (bad data under data.strict, an epoch with no usable sample) is raised
    here as itself, one line, and recorded so that no restart of the worker group retries it."""

    def __init__(self, spec: dict, start_sample: int, readers: int, prefetch: int):
        _raise_recorded_user_error()
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
        try:
            b = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            user = _user_error(e)
            if user is None:
                raise
            from ray.experimental import internal_kv
            internal_kv._internal_kv_put(_job_key(), str(user).encode(), overwrite=False)
            raise type(user)(str(user)) from None
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
