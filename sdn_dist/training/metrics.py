"""One ``log(records)`` interface on the driver; backends fan out: metrics.jsonl always, Prometheus
when ``metrics.port`` is set, TensorBoard event files under ``<out>/tensorboard/`` when
``metrics.tensorboard`` is on. Workers never open ports: they send records to the record collector, the
driver drains it (every 0.5 s) and updates the metrics here, served at ``metrics.host:metrics.port``.
Metric names, types and labels: docs/metrics.md (keep it in step: tests/test_metrics.py checks).

Label cardinality is bounded by construction: ``run_id`` and ``attempt`` are constant for the
process; ``rank`` < ``workers``; ``stage`` in {1, 2}; ``level`` is one of the model's matched points
(at most ``MAX_LEVELS``); ``reason`` is one of ``SKIP_REASONS`` or ``other``; ``cause`` one of
``RECOVERY_CAUSES``.
"""

from __future__ import annotations

import logging
import errno
import io
import json
import os
import shutil
import socket
import tempfile
import time

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from torch.utils.tensorboard import SummaryWriter

from sdn_dist import fsio
from sdn_dist.config import MetricsConfig
from sdn_dist.errors import ConfigError

log = logging.getLogger(__name__)

try:  # the label values of sdn_data_samples_skipped_total{reason}
    from sdn_dist.data.pipeline import SKIP_REASONS
except Exception:  # noqa: BLE001 - the data package is optional for the exporter itself
    SKIP_REASONS = ()
OTHER_REASON = "other"
MAX_LEVELS = 64   # loss levels: 22 matched points + image + total in the paper model

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECOVERY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RECOVERY_CAUSES = ("worker_restart", "preempted", "rerun")   # training/recovery.py
CHECKPOINT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _Worker:
    """What the exporter remembers about one rank's current process (a restart = a new pid)."""

    def __init__(self, pid):
        self.pid = pid
        self.step: int | None = None
        self.skipped: dict[str, int] = {}


class PrometheusExporter:
    """prometheus_client metrics in a private registry, fed with the trainers' records.

    ``log(record)`` takes the records of ``training/loop.py`` (through the collector): per logged
    step (``step``, ``stage``, ``rank``, ``loss``, ``loss/<point>``, ``samples_per_sec``, ``data_wait_seconds``,
    ``step_seconds``, ``window_steps``, ``samples``, ``skipped``, ``pid``) and events
    (``checkpoint``, ``final``). Serves over HTTP when ``cfg.port`` is set (or after ``serve()``).
    """

    def __init__(self, cfg: MetricsConfig, run_id: str, attempt: str | int):
        self.cfg = cfg
        self.registry = r = CollectorRegistry()
        self.const = {"run_id": str(run_id), "attempt": str(attempt)}
        c = list(self.const)
        self.stage = Gauge("sdn_train_stage", "Current training stage: 1 = direct distillation, 2 = distillation through the teacher.", c, registry=r)
        self.step = Gauge("sdn_train_step", "Optimizer steps completed over the whole run (stage 2 continues the count of stage 1).", c, registry=r)
        self.samples = Counter("sdn_train_samples", "Training samples drawn by all workers (global batch x optimizer steps) in this attempt.", c, registry=r)
        self.samples.labels(**self.const)    # 0 from the start: a run that never steps is a stall (k8s/prometheus alerts)
        self.throughput = Gauge("sdn_train_samples_per_second", "Training throughput of the whole job over the last logging window (samples trained on per second, rank 0's measurement).", c, registry=r)
        self.loss = Gauge("sdn_train_loss", "Last logged distillation loss of rank 0, by stage and matched point (level=total: the weighted sum that is optimized).", c + ["stage", "level"], registry=r)
        self.step_time = Histogram("sdn_train_step_seconds", "Wall time of one optimizer step (mean over each logging window, observed once per step).", c + ["rank"], registry=r,
                                   buckets=STEP_BUCKETS)
        self.wait = Counter("sdn_data_wait_seconds", "Seconds the training worker waited for its next micro-batch from the shard readers.", c + ["rank"], registry=r)
        self.skipped = Counter("sdn_data_samples_skipped", "Samples skipped as unusable, by reason (all workers).", c + ["reason"], registry=r)
        self.ckpt_time = Gauge("sdn_checkpoint_last_success_timestamp_seconds", "Unix time at which the last checkpoint was completely written.", c, registry=r)
        self.ckpt_step = Gauge("sdn_checkpoint_last_success_step", "Optimizer step of the last complete checkpoint.", c, registry=r)
        self.ckpt_dur = Histogram("sdn_checkpoint_duration_seconds", "Wall time to write one checkpoint (all ranks, until complete).", c, registry=r,
                                  buckets=CHECKPOINT_BUCKETS)
        self.upload_time = Histogram("sdn_checkpoint_upload_seconds", "Wall time of one rank's upload of one checkpoint from local staging to remote storage (s3:// out), retries included; in the background while training goes on.", c + ["rank"], registry=r,
                                     buckets=CHECKPOINT_BUCKETS)
        self.ckpt_failed = Counter("sdn_checkpoint_failures", "Checkpoints given up because an upload still failed after its retries (earlier checkpoints untouched), by rank.", c + ["rank"], registry=r)
        self.ckpt_blocked = Histogram("sdn_checkpoint_blocked_seconds", "Wall time training was held up by one checkpoint (with a background upload: the local write only).", c, registry=r,
                                      buckets=CHECKPOINT_BUCKETS)
        self.world = Gauge("sdn_train_world_size", "Training workers in the current worker group (an elastic run, workers=MIN-MAX, changes it after losing or gaining nodes).", c, registry=r)
        self.restarts = Counter("sdn_train_restarts", "Worker-group starts that were not the fresh start of a run: restarts after a failure or a resize, and the resume of a rerun.", c, registry=r)
        self.restarts.labels(**self.const)   # 0 from the start: increase() sees the first restart
        self.recovery = Histogram("sdn_train_recovery_seconds", "Time from a fault to the end of the first optimizer step after it, by cause (worker_restart: Ray Train restarted the worker group; preempted / rerun: a rerun resumed after a preemption checkpoint / after the previous attempt was lost); the fault is dated by the last record before it.", c + ["cause"], registry=r,
                                  buckets=RECOVERY_BUCKETS)
        for cause in RECOVERY_CAUSES:       # 0 from the start: increase() sees the first recovery
            self.recovery.labels(**self.const, cause=cause)
        self.goodput = Gauge("sdn_train_goodput", "Steps done x median step time / wall time since the run's first attempt started, set at the end of each attempt (1 = no time lost; docs/metrics.md).", c, registry=r)
        self._starts = 0
        for reason in (*SKIP_REASONS, OTHER_REASON):   # 0 from the start: rate()/increase() see the first skip
            self.skipped.labels(**self.const, reason=reason)
        self._workers: dict[str, _Worker] = {}
        self._levels: set[str] = set()
        self.server = None
        self.thread = None
        if cfg.port:
            self.serve(cfg.port, cfg.host)

    # -- serving -------------------------------------------------------------------------------
    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Start the HTTP endpoint (``/metrics``); port 0 picks a free one (see ``self.port``)."""
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except socket.gaierror as e:
            raise ConfigError(f"metrics.host={host!r}: not an address this machine can listen on ({e.strerror})") from e
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"metrics.host={host!r}: not an address of this machine ({e.strerror})") from e
            why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise ConfigError(f"metrics.port={port}: cannot serve Prometheus metrics on {host}:{port}: {why}") from e

    @property
    def address(self) -> tuple[str, int] | None:
        return None if self.server is None else self.server.server_address[:2]

    @property
    def url(self) -> str | None:
        if self.server is None:
            return None
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    # -- records -------------------------------------------------------------------------------
    def log(self, rec: dict) -> None:
        L = self.const
        event = rec.get("event")
        if event == "checkpoint":
            self.ckpt_time.labels(**L).set(rec.get("time", time.time()))
            self.ckpt_step.labels(**L).set(rec.get("step", 0))
            self.ckpt_dur.labels(**L).observe(max(0.0, rec.get("checkpoint_seconds", 0.0)))
            self.ckpt_blocked.labels(**L).observe(max(0.0, rec.get("blocked_seconds", rec.get("checkpoint_seconds", 0.0))))
            return
        if event == "checkpoint_upload":
            rank = str(rec.get("rank", 0))
            if rec.get("ok", True):
                self.upload_time.labels(**L, rank=rank).observe(max(0.0, rec.get("upload_seconds", 0.0)))
            else:
                self.ckpt_failed.labels(**L, rank=rank).inc()
            return
        if event == "start":   # rank 0, once per worker-group start (see loop.train_worker)
            self._starts += 1
            if self._starts > 1 or rec.get("step", 0) > 0:
                self.restarts.labels(**L).inc()
            self.world.labels(**L).set(rec.get("world_size", 1))
            return
        if event == "recovered":
            cause = rec.get("cause") if rec.get("cause") in RECOVERY_CAUSES else RECOVERY_CAUSES[-1]
            self.recovery.labels(**L, cause=cause).observe(max(0.0, float(rec.get("seconds", 0.0))))
            return
        if event == "summary":
            if rec.get("goodput") is not None:
                self.goodput.labels(**L).set(rec["goodput"])
            return
        if event == "final":   # the final cumulative skip counts (deduplicated like any other)
            self._skips(self._worker(rec), rec.get("skipped"))
            return
        if event is not None or "step" not in rec:
            return
        w = self._worker(rec)
        rank = str(rec.get("rank", 0))
        step = int(rec["step"])
        self.ckpt_failed.labels(**L, rank=rank)   # 0 before a failure, so that increase() sees the first one
        n = rec.get("window_steps") or (step - w.step if w.step is not None and step > w.step else 1)
        w.step = step
        for _ in range(max(1, int(n))):
            self.step_time.labels(**L, rank=rank).observe(max(0.0, rec.get("step_seconds", 0.0)))
        self.wait.labels(**L, rank=rank).inc(max(0.0, rec.get("data_wait_seconds", 0.0)))
        self._skips(w, rec.get("skipped"))
        if rec.get("rank", 0) != 0:
            return
        self.stage.labels(**L).set(rec["stage"])
        if "world_size" in rec:
            self.world.labels(**L).set(rec["world_size"])
        self.step.labels(**L).set(step)
        if step > 0 and rec.get("samples"):
            self.samples.labels(**L).inc(max(1, int(n)) * rec["samples"] / step)   # samples/step = global batch
        if "samples_per_sec" in rec:
            self.throughput.labels(**L).set(rec["samples_per_sec"])
        stage = str(rec["stage"])
        if "loss" in rec:
            self.loss.labels(**L, stage=stage, level="total").set(rec["loss"])
        for k, v in rec.items():
            if k.startswith("loss/") and self._level_ok(k[5:]):
                self.loss.labels(**L, stage=stage, level=k[5:]).set(v)

    def _worker(self, rec: dict) -> _Worker:
        """Per-rank state; a new pid for a rank (a worker-group restart) starts its counts afresh."""
        rank, pid = str(rec.get("rank", 0)), rec.get("pid")
        w = self._workers.get(rank)
        if w is None or (pid is not None and pid != w.pid):
            w = self._workers[rank] = _Worker(pid)
        return w

    def _skips(self, w: _Worker, skipped: dict | None) -> None:
        """Records carry each rank's cumulative counts: add only what is new since the last one."""
        for reason, n in (skipped or {}).items():
            delta = int(n) - w.skipped.get(reason, 0)
            if delta > 0:
                label = reason if reason in SKIP_REASONS else OTHER_REASON
                self.skipped.labels(**self.const, reason=label).inc(delta)
            w.skipped[reason] = max(int(n), w.skipped.get(reason, 0))

    def _level_ok(self, level: str) -> bool:
        if level in self._levels:
            return True
        if len(self._levels) >= MAX_LEVELS:
            return False
        self._levels.add(level)
        return True

    # -- shutdown ------------------------------------------------------------------------------
    def close(self, linger_seconds: float = 0.0) -> None:
        """Stop serving; with ``linger_seconds``, keep serving the final values that long first so
        that Prometheus scrapes them (Ctrl-C ends the wait)."""
        if self.server is None:
            return
        try:
            if linger_seconds > 0:
                log.info(f"metrics: serving the final values at {self.url} for {linger_seconds:g}s "
                         "(metrics.linger_seconds)")
                time.sleep(linger_seconds)
        except KeyboardInterrupt:
            pass
        finally:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class TensorBoardWriter:
    """Rank 0's step records -> scalars, the sample grids (``samples`` events) -> images, in
    TensorBoard event files under ``<out>/tensorboard/`` (torch.utils.tensorboard's SummaryWriter).

    Scalars, at ``global_step`` = the record's ``step``: ``loss`` (the optimized total),
    ``loss/<point>`` (each matched point), ``samples_per_sec``, ``step_seconds``,
    ``data_wait_seconds``, ``stage``, ``lr``. Image: ``samples`` (the
    generated-vs-real grid PNG the event names, read back from the run directory).

    The event-file writer can only write local files, so for a remote ``out`` (``s3://``) it writes
    to a local temporary folder and copies the files up every ``UPLOAD_SECONDS`` and at
    ``close()``. Each process writes its own file (TensorBoard's name carries time, host and pid),
    so a resumed run adds a file beside the earlier ones and TensorBoard shows both as one run.
    """

    SCALARS = ("loss", "samples_per_sec", "step_seconds", "data_wait_seconds", "stage", "lr")
    UPLOAD_SECONDS = 30.0

    def __init__(self, out: str):
        self.url = fsio.join(out, "tensorboard")
        local = fsio.local_path(self.url)
        self.remote = local is None
        self.dir = tempfile.mkdtemp(prefix="sdn-tensorboard-") if self.remote else local
        with fsio.writing(self.url):
            self.writer = SummaryWriter(log_dir=self.dir, flush_secs=10)
        self._uploaded = time.time()
        self._last_image = None

    def log(self, rec: dict) -> None:
        event = rec.get("event")
        if event == "samples" and rec.get("url"):
            self._image(rec)
        elif event is None and "step" in rec and rec.get("rank", 0) == 0:
            step = int(rec["step"])
            for k, v in rec.items():
                if (k in self.SCALARS or k.startswith("loss/")) and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step, walltime=rec.get("time"))
        if self.remote and time.time() - self._uploaded > self.UPLOAD_SECONDS:
            self.upload()

    def _image(self, rec: dict) -> None:
        if (rec["step"], rec["url"]) == self._last_image:   # the loop rewrites a grid at a stage end
            return
        self._last_image = (rec["step"], rec["url"])
        fs, path = fsio.url_to_fs(rec["url"])
        try:
            png = fs.cat_file(path)
        except OSError as e:   # a grid that cannot be read back costs its image, not the run
            log.warning(f"tensorboard: cannot read sample grid {rec['url']}: {e}")
            return
        with Image.open(io.BytesIO(png)) as im:
            img = np.asarray(im.convert("RGB"))   # [H,W,3] uint8
        self.writer.add_image("samples", img, int(rec["step"]), walltime=rec.get("time"), dataformats="HWC")

    def upload(self) -> None:
        """Copy the local event files to the remote ``<out>/tensorboard/`` (whole files: small)."""
        self.writer.flush()
        self._uploaded = time.time()
        if not self.remote:
            return
        fs, root = fsio.url_to_fs(self.url)
        for name in os.listdir(self.dir):
            with fsio.writing(self.url):
                fs.put_file(os.path.join(self.dir, name), f"{root}/{name}")

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            self.upload()
            shutil.rmtree(self.dir, ignore_errors=True)


class MetricsSink:
    """Driver-side: records -> ``<out>/metrics.jsonl`` and ``events.jsonl`` (+ Prometheus, TensorBoard)."""

    def __init__(self, out: str, cfg: MetricsConfig, run_id: str, attempt: str | int):
        self.cfg = cfg
        self.path = fsio.join(out, "metrics.jsonl")
        self.events = fsio.join(out, "events.jsonl")
        self.prom = PrometheusExporter(cfg, run_id, attempt) if cfg.port else None
        self.tb = TensorBoardWriter(out) if getattr(cfg, "tensorboard", False) else None

    def log(self, records: list[dict]) -> None:
        fsio.append_lines(self.path, [json.dumps(r) for r in records if r.get("event") is None])
        fsio.append_lines(self.events, [json.dumps(r) for r in records if r.get("event") is not None])
        for backend in (self.prom, self.tb):
            if backend:
                for r in records:
                    backend.log(r)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.prom:
            self.prom.close(getattr(self.cfg, "linger_seconds", 0.0))
