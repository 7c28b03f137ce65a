"""One ``log(records)`` interface on the driver; backends fan out: metrics.jsonl always, Prometheus
when ``metrics.port`` is set. Workers never open ports: they send records to the coordinator, the
driver drains it. Metric names and labels: docs/metrics.md.
"""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from . import fsio
from .config import MetricsConfig


class PrometheusExporter:
    def __init__(self, cfg: MetricsConfig, run_id: str, attempt: int):
        self.registry = r = CollectorRegistry()
        self.const = {"run_id": run_id, "attempt": str(attempt)}
        c = list(self.const)
        self.stage = Gauge("sdn_train_stage", "Current training stage (1 = direct distillation, 2 = through the teacher).", c, registry=r)
        self.step = Gauge("sdn_train_step", "Optimizer steps completed over the whole run.", c, registry=r)
        self.samples = Counter("sdn_train_samples", "Training samples consumed (all workers).", c, registry=r)
        self.loss = Gauge("sdn_train_loss", "Distillation loss by stage and matched point (level=total for the sum), rank 0.", c + ["stage", "level"], registry=r)
        self.throughput = Gauge("sdn_train_samples_per_second", "Training throughput over the last logging window.", c + ["rank"], registry=r)
        self.step_time = Histogram("sdn_train_step_seconds", "Wall time of one optimizer step.", c + ["rank"], registry=r,
                                   buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.skipped = Counter("sdn_data_samples_skipped", "Samples skipped as unusable, by reason.", c + ["reason"], registry=r)
        self.wait = Counter("sdn_data_wait_seconds", "Seconds training workers waited for data.", c + ["rank"], registry=r)
        self.ckpt_time = Gauge("sdn_checkpoint_last_success_timestamp_seconds", "Unix time of the last complete checkpoint.", c, registry=r)
        self.ckpt_dur = Gauge("sdn_checkpoint_duration_seconds", "Seconds the last checkpoint took to write.", c, registry=r)
        self._samples_seen = 0
        self._skipped_seen: dict[tuple, int] = {}
        self.server = None
        if cfg.port:
            self.server, _ = start_http_server(cfg.port, addr=cfg.host, registry=r)

    def log(self, rec: dict) -> None:
        L = self.const
        if rec.get("event") == "checkpoint":
            self.ckpt_time.labels(**L).set(rec["time"])
            self.ckpt_dur.labels(**L).set(rec["checkpoint_seconds"])
        if rec.get("event"):
            return
        rank = str(rec.get("rank", 0))
        self.wait.labels(**L, rank=rank).inc(max(0.0, rec.get("data_wait_seconds", 0.0)))
        self.throughput.labels(**L, rank=rank).set(rec.get("samples_per_sec", 0.0))
        self.step_time.labels(**L, rank=rank).observe(rec.get("step_seconds", 0.0))
        for reason, n in (rec.get("skipped") or {}).items():
            key = (rank, reason)
            delta = n - self._skipped_seen.get(key, 0)
            if delta > 0:
                self.skipped.labels(**L, reason=reason).inc(delta)
            self._skipped_seen[key] = n
        if rec.get("rank", 0) != 0:
            return
        stage = str(rec["stage"])
        self.stage.labels(**L).set(rec["stage"])
        self.step.labels(**L).set(rec["step"])
        if rec["samples"] > self._samples_seen:
            self.samples.labels(**L).inc(rec["samples"] - self._samples_seen)
        self._samples_seen = rec["samples"]
        self.loss.labels(**L, stage=stage, level="total").set(rec["loss"])
        for k, v in rec.items():
            if k.startswith("loss/"):
                self.loss.labels(**L, stage=stage, level=k[5:]).set(v)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class MetricsSink:
    """Driver-side: records -> ``<out>/metrics.jsonl`` (+ Prometheus)."""

    def __init__(self, out: str, cfg: MetricsConfig, run_id: str, attempt: int):
        self.path = fsio.join(out, "metrics.jsonl")
        self.events = fsio.join(out, "events.jsonl")
        self.prom = PrometheusExporter(cfg, run_id, attempt) if cfg.port else None

    def log(self, records: list[dict]) -> None:
        fsio.append_lines(self.path, [json.dumps(r) for r in records if r.get("event") is None])
        fsio.append_lines(self.events, [json.dumps(r) for r in records if r.get("event") is not None])
        if self.prom:
            for r in records:
                self.prom.log(r)

    def close(self) -> None:
        if self.prom:
            self.prom.close()
