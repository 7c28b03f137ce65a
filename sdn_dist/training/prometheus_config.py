"""A Prometheus scrape config (YAML) for sdn-dist's metrics and Ray's own.

Outside Kubernetes (there the PodMonitor in k8s/base/podmonitor.yaml does this job):

    python -m sdn_dist.training.prometheus_config --sdn 127.0.0.1:9400 --ray 127.0.0.1:8080 > prometheus.yml
    prometheus --config.file=prometheus.yml

Two jobs: ``sdn-dist`` scrapes the training driver's endpoint (``metrics.host:metrics.port``; the
sdn_* metrics, which carry their own ``run_id``/``attempt`` labels, hence ``honor_labels``), and
``ray`` scrapes every Ray node's metrics-export port (``ray start --metrics-export-port=8080``; the
ray_* metrics), from a static target list and/or the service-discovery file Ray keeps up to date
on the head node (``/tmp/ray/prom_metrics_service_discovery.json``). See docs/metrics.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable

import yaml

from sdn_dist.errors import UserError, error_line

RAY_DISCOVERY_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(duration: str | float) -> float:
    """Prometheus duration ('1s', '500ms', '1m30s') or a number of seconds -> seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r} (e.g. 15s, 500ms, 1m)")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def _duration(duration: str | float) -> str:
    if isinstance(duration, str):
        _seconds(duration)
        return duration
    ms = round(float(duration) * 1000)
    if ms <= 0:
        raise ValueError(f"scrape interval must be positive, not {duration!r}")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _target(t: str) -> str:
    if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}", t):
        raise ValueError(f"scrape target {t!r} is not host:port")
    return t


def scrape_config(sdn_targets: Iterable[str], ray_targets: Iterable[str] = (), *,
                  ray_discovery_files: Iterable[str] = (), scrape_interval: str | float = "15s",
                  labels: dict[str, str] | None = None) -> dict:
    """The config as a dict (``scrape_config_yaml`` renders it).

    sdn_targets: ``host:port`` of the training driver's endpoint(s) (``metrics.port``).
    ray_targets: ``host:port`` of Ray nodes' metrics-export ports. ray_discovery_files: Ray's
    service-discovery JSON (``RAY_DISCOVERY_FILE`` on the head node), for clusters whose nodes
    come and go. labels: extra target labels (e.g. ``{"cluster": "lab"}``) on both jobs.
    """
    interval = _duration(scrape_interval)
    # scrape_timeout may not exceed the interval (Prometheus' default timeout is 10s)
    timeout = interval if _seconds(interval) <= 10 else "10s"
    extra = dict(labels or {})

    def static(targets):
        return [{"targets": [_target(t) for t in targets], **({"labels": dict(extra)} if extra else {})}]

    jobs = []
    sdn = list(sdn_targets)
    if sdn:
        jobs.append({"job_name": "sdn-dist", "honor_labels": True, "metrics_path": "/metrics",
                     "static_configs": static(sdn)})
    ray = list(ray_targets)
    files = list(ray_discovery_files)
    if ray or files:
        job = {"job_name": "ray", "metrics_path": "/metrics"}
        if ray:
            job["static_configs"] = static(ray)
        if files:
            job["file_sd_configs"] = [{"files": files, "refresh_interval": "30s"}]
            if extra:
                job["relabel_configs"] = [{"target_label": k, "replacement": v} for k, v in extra.items()]
        jobs.append(job)
    if not jobs:
        raise ValueError("no scrape targets: give at least one sdn-dist or Ray target")
    return {"global": {"scrape_interval": interval, "scrape_timeout": timeout, "evaluation_interval": interval},
            "scrape_configs": jobs}


def scrape_config_yaml(sdn_targets: Iterable[str], ray_targets: Iterable[str] = (), **kw) -> str:
    """``prometheus.yml`` text scraping the given targets (arguments as in ``scrape_config``)."""
    head = "# Prometheus scrape config for sdn-dist (python -m sdn_dist.training.prometheus_config); see docs/metrics.md\n"
    return head + yaml.safe_dump(scrape_config(sdn_targets, ray_targets, **kw), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdn_dist.training.prometheus_config",
                                description="Print a Prometheus scrape config for sdn-dist and Ray metrics.")
    p.add_argument("--sdn", action="append", default=[], metavar="HOST:PORT",
                   help="the training driver's endpoint (metrics.host:metrics.port); repeatable")
    p.add_argument("--ray", action="append", default=[], metavar="HOST:PORT",
                   help="a Ray node's metrics-export port; repeatable")
    p.add_argument("--ray-discovery", action="append", default=[], metavar="FILE",
                   help=f"Ray's service-discovery file (on the head node: {RAY_DISCOVERY_FILE}); repeatable")
    p.add_argument("--interval", default="15s", help="scrape interval (default 15s)")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="extra target label; repeatable")
    a = p.parse_args(argv)
    try:
        labels = dict(kv.split("=", 1) for kv in a.label)
    except ValueError:
        p.error("--label wants K=V")
    try:
        sys.stdout.write(scrape_config_yaml(a.sdn, a.ray, ray_discovery_files=a.ray_discovery,
                                            scrape_interval=a.interval, labels=labels))
    except ValueError as e:   # a bad address or label: the user's input
        print(error_line(UserError(str(e))), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
