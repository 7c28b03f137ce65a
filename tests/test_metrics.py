"""Prometheus monitoring: the exporter over real HTTP, the generated scrape config (promtool), the
Grafana dashboard and docs/metrics.md against the exporter's registry; and (slow tier) a real
Prometheus server scraping a real `sdn-dist train` run.

The system tools (`prometheus`, `promtool`) come from `bash scripts/setup.sh`; a test that needs one
and does not find it fails and says so (never skips).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sdn_dist.config import MetricsConfig
from sdn_dist.errors import ConfigError
from sdn_dist.training.metrics import OTHER_REASON, SKIP_REASONS, MetricsSink, PrometheusExporter
from sdn_dist.training.prometheus_config import scrape_config, scrape_config_yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "k8s" / "grafana" / "sdn-dashboard.json"
DOCS = ROOT / "docs" / "metrics.md"
SETUP_HINT = "run `bash scripts/setup.sh` (it installs the Debian package `prometheus`, which has promtool)"

# The issue's / contract's names: what a user's dashboards and alerts may rely on.
REQUIRED = {"sdn_train_stage", "sdn_train_step", "sdn_train_samples_total", "sdn_train_loss",
            "sdn_data_samples_skipped_total", "sdn_data_wait_seconds_total",
            "sdn_checkpoint_last_success_timestamp_seconds", "sdn_checkpoint_duration_seconds_bucket",
            "sdn_train_step_seconds_bucket", "sdn_train_samples_per_second"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"`{name}` is not on PATH: {SETUP_HINT}", pytrace=False)
    return path


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    """GET /metrics and parse it with prometheus_client's parser: sample name -> [(labels, value)]."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, name, **labels) -> float:
    hits = [v for l, v in samples.get(name, []) if all(l.get(k) == str(x) for k, x in labels.items())]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} series in {samples.get(name)}"
    return hits[0]


def exported_names(registry) -> set[str]:
    """Every sample name the registry can expose, with the _total/_created/_bucket/_sum/_count suffixes."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
    return {fam.name + s for fam in registry.collect() for s in suffixes[fam.type]}


# ---------------------------------------------------------------------------------------------
# the exporter, through real HTTP

def rec(rank, pid, step, stage, **kw):
    base = {"step": step, "stage": stage, "rank": rank, "attempt": "a1", "pid": pid, "loss": 1.0,
            "samples_per_sec": 100.0, "data_wait_seconds": 0.0, "step_seconds": 0.1, "window_steps": 1,
            "samples": step * 8, "skipped": {}, "time": 1.0e9}
    return base | kw


@pytest.fixture
def exporter():
    exp = PrometheusExporter(MetricsConfig(log_every=1), run_id="run-a", attempt="a1")
    exp.serve(0, "127.0.0.1")
    yield exp
    exp.close()


def test_exporter_names_labels_values_over_http(exporter):
    t_ckpt = 1_700_000_000.5
    feed = [
        rec(0, 100, 1, 1, loss=2.0, **{"loss/conv1_1": 0.5}, data_wait_seconds=0.25, step_seconds=0.2,
            skipped={"bad_image": 1}),
        rec(1, 101, 1, 1, data_wait_seconds=0.5, skipped={"bad_image": 2, "empty_caption": 1}),
        # cumulative per-rank skip counts re-sent unchanged: nothing new
        rec(0, 100, 3, 1, loss=1.5, **{"loss/conv1_1": 0.4}, window_steps=2, step_seconds=0.3,
            data_wait_seconds=0.25, skipped={"bad_image": 1}),
        rec(1, 101, 3, 1, window_steps=2, skipped={"bad_image": 2, "empty_caption": 1}),
        {"event": "checkpoint", "step": 3, "stage": 1, "rank": 0, "checkpoint_seconds": 1.5, "time": t_ckpt},
        {"event": "message", "text": "switched to stage 2 at step 3", "time": 1.0},
        rec(0, 100, 4, 2, loss=1.0, **{"loss/conv1_1": 0.25}, samples_per_sec=123.0, skipped={"bad_image": 2}),
        # rank 1 restarted (a new process): its cumulative counts start again from 0
        rec(1, 202, 4, 2, skipped={"bad_image": 1}),
        # the final events repeat the last counts; a reason this exporter does not know -> "other"
        {"event": "final", "rank": 0, "pid": 100, "step": 4, "stage": 2, "skipped": {"bad_image": 2}},
        {"event": "final", "rank": 1, "pid": 202, "step": 4, "stage": 2, "skipped": {"bad_image": 1, "weird": 3}},
    ]
    for r in feed:
        exporter.log(r)
    host, port = exporter.address
    assert host == "127.0.0.1" and port > 0
    m = scrape(exporter.url)
    L = {"run_id": "run-a", "attempt": "a1"}

    assert value(m, "sdn_train_stage", **L) == 2
    assert value(m, "sdn_train_step", **L) == 4
    assert value(m, "sdn_train_samples_total", **L) == 4 * 8          # global batch 8 x 4 steps
    assert value(m, "sdn_train_samples_per_second", **L) == 123.0
    assert value(m, "sdn_train_loss", **L, stage=1, level="total") == 1.5
    assert value(m, "sdn_train_loss", **L, stage=1, level="conv1_1") == 0.4
    assert value(m, "sdn_train_loss", **L, stage=2, level="total") == 1.0
    assert value(m, "sdn_train_loss", **L, stage=2, level="conv1_1") == 0.25
    assert {l["stage"] for l, _ in m["sdn_train_loss"]} == {"1", "2"}

    # skipped: r0 1 + r1 2 + r0 1 more + r1 (new process) 1 = 5 bad_image; no double counting
    assert value(m, "sdn_data_samples_skipped_total", **L, reason="bad_image") == 5
    assert value(m, "sdn_data_samples_skipped_total", **L, reason="empty_caption") == 1
    assert value(m, "sdn_data_samples_skipped_total", **L, reason=OTHER_REASON) == 3
    reasons = {l["reason"] for l, _ in m["sdn_data_samples_skipped_total"]}
    assert reasons == set(SKIP_REASONS) | {OTHER_REASON}, "every reason is exported from the start (0)"
    assert value(m, "sdn_data_samples_skipped_total", **L, reason="missing_caption") == 0

    assert value(m, "sdn_data_wait_seconds_total", **L, rank=0) == pytest.approx(0.5)
    assert value(m, "sdn_data_wait_seconds_total", **L, rank=1) == pytest.approx(0.5)
    # step-time histogram: one observation per optimizer step (window_steps), per rank
    assert value(m, "sdn_train_step_seconds_count", **L, rank=0) == 4
    assert value(m, "sdn_train_step_seconds_sum", **L, rank=0) == pytest.approx(0.2 + 2 * 0.3 + 0.1)
    assert value(m, "sdn_train_step_seconds_count", **L, rank=1) == 4
    assert value(m, "sdn_train_step_seconds_bucket", **L, rank=0, le="0.25") == 2
    assert value(m, "sdn_train_step_seconds_bucket", **L, rank=0, le="+Inf") == 4

    assert value(m, "sdn_checkpoint_last_success_timestamp_seconds", **L) == t_ckpt
    assert value(m, "sdn_checkpoint_last_success_step", **L) == 3
    assert value(m, "sdn_checkpoint_duration_seconds_count", **L) == 1
    assert value(m, "sdn_checkpoint_duration_seconds_sum", **L) == 1.5

    # every sdn sample carries the run's identity; per-worker series carry rank (bounded: < workers)
    for name, series in m.items():
        if name.startswith("sdn_"):
            assert all(l.get("run_id") == "run-a" and l.get("attempt") == "a1" for l, _ in series), name
    for name in ("sdn_train_step_seconds_count", "sdn_data_wait_seconds_total"):
        assert {l["rank"] for l, _ in m[name]} == {"0", "1"}


def test_world_size_and_restarts_from_worker_group_starts(exporter):
    """Rank 0 reports a start event per worker-group start: a fresh start is not a restart; a later
    one (after losing a node, here on fewer workers) is; a rerun's resumed start is too."""
    L = {"run_id": "run-a", "attempt": "a1"}
    exporter.log({"event": "start", "rank": 0, "step": 0, "stage": 1, "world_size": 2, "pid": 100})
    exporter.log(rec(0, 100, 5, 1, world_size=2))
    m = scrape(exporter.url)
    assert value(m, "sdn_train_world_size", **L) == 2 and value(m, "sdn_train_restarts_total", **L) == 0
    exporter.log({"event": "start", "rank": 0, "step": 4, "stage": 1, "world_size": 1, "pid": 300})
    m = scrape(exporter.url)
    assert value(m, "sdn_train_world_size", **L) == 1 and value(m, "sdn_train_restarts_total", **L) == 1
    rerun = PrometheusExporter(MetricsConfig(), run_id="run-a", attempt="a2")
    rerun.log({"event": "start", "rank": 0, "step": 8, "stage": 2, "world_size": 2, "pid": 400})
    assert rerun.registry.get_sample_value("sdn_train_restarts_total", {"run_id": "run-a", "attempt": "a2"}) == 1


def test_metric_names_follow_prometheus_conventions():
    exp = PrometheusExporter(MetricsConfig(), run_id="r", attempt="0")
    fams = {f.name: f for f in exp.registry.collect()}
    for name, f in fams.items():
        assert re.fullmatch(r"sdn_(train|data|checkpoint)_[a-z0-9_]+", name), name
        assert f.documentation, f"{name} has no HELP text"
        if f.type == "counter":
            assert not name.endswith("_total")   # the client appends _total
        if "time" in name or "duration" in name or "wait" in name:
            assert name.endswith("_seconds"), f"{name}: time in base units, suffix _seconds"
        assert not re.search(r"_(ms|milliseconds|minutes|hours)\b", name)
    assert REQUIRED <= exported_names(exp.registry)
    # identity labels only where they belong; no unbounded label (step, pid, time, ...)
    allowed = {"run_id", "attempt", "rank", "stage", "level", "reason", "cause", "le"}   # cause: RECOVERY_CAUSES
    exp.log(rec(0, 1, 1, 1, **{"loss/conv1_1": 0.1}, skipped={"bad_image": 1}))
    exp.log({"event": "checkpoint", "step": 1, "stage": 1, "rank": 0, "checkpoint_seconds": 0.1, "time": 1.0})
    labels = {k for f in exp.registry.collect() for s in f.samples for k in s.labels}
    assert labels <= allowed, labels - allowed


def test_port_zero_is_off_and_records_still_reach_metrics_jsonl(tmp_path):
    sink = MetricsSink(str(tmp_path), MetricsConfig(port=0), "r", "0")
    assert sink.prom is None
    sink.log([rec(0, 1, 1, 1), {"event": "checkpoint", "step": 1, "stage": 1, "rank": 0,
                                "checkpoint_seconds": 0.1, "time": 1.0}])
    sink.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1
    assert json.loads((tmp_path / "events.jsonl").read_text())["event"] == "checkpoint"


def test_endpoint_binds_loopback_by_default_and_port_in_use_is_a_config_error(tmp_path):
    assert MetricsConfig().host == "127.0.0.1" and MetricsConfig().port == 0
    port = free_port()
    sink = MetricsSink(str(tmp_path), MetricsConfig(port=port), "r", "0")
    try:
        assert sink.prom.address == ("127.0.0.1", port)
        assert "sdn_data_samples_skipped_total" in scrape(f"http://127.0.0.1:{port}/metrics")
        with pytest.raises(ConfigError, match=rf"metrics\.port={port}.*in use"):
            PrometheusExporter(MetricsConfig(port=port), "r", "1")
    finally:
        sink.close()
    with pytest.raises(ConfigError, match="metrics.host"):
        PrometheusExporter(MetricsConfig(port=free_port(), host="192.0.2.1"), "r", "0")


def test_linger_keeps_serving_final_values_then_stops(exporter):
    exporter.log(rec(0, 1, 7, 2))
    url = exporter.url
    t0 = time.time()
    closer = threading.Thread(target=exporter.close, args=(1.5,))
    closer.start()
    time.sleep(0.3)
    assert value(scrape(url), "sdn_train_step", run_id="run-a", attempt="a1") == 7   # still served
    closer.join(10)
    assert time.time() - t0 >= 1.5
    with pytest.raises(urllib.error.URLError):
        scrape(url)
    assert MetricsConfig().linger_seconds == 0
    with pytest.raises(ValueError):
        MetricsConfig(linger_seconds=-1)


# ---------------------------------------------------------------------------------------------
# the generated scrape config

def test_generated_scrape_config_passes_promtool(tmp_path):
    promtool = tool("promtool")
    cases = {
        "local.yml": scrape_config_yaml(["127.0.0.1:9400"], scrape_interval="1s"),
        "ray.yml": scrape_config_yaml(["10.0.0.5:9400"], ["10.0.0.5:8080", "10.0.0.6:8080"],
                                      ray_discovery_files=["/tmp/ray/prom_metrics_service_discovery.json"],
                                      scrape_interval="2m", labels={"cluster": "lab"}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        r = subprocess.run([promtool, "check", "config", str(tmp_path / name)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{name}:\n{text}\n{r.stdout}{r.stderr}"
    local = yaml.safe_load(cases["local.yml"])
    assert local["global"]["scrape_interval"] == "1s" and local["global"]["scrape_timeout"] == "1s"
    (job,) = local["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9400"] and job["honor_labels"] is True
    ray = yaml.safe_load(cases["ray.yml"])
    assert ray["global"]["scrape_timeout"] == "10s"
    assert [j["job_name"] for j in ray["scrape_configs"]] == ["sdn-dist", "ray"]
    # a broken config must be caught by the same check (the test can fail)
    (tmp_path / "bad.yml").write_text(cases["local.yml"].replace("scrape_timeout: 1s", "scrape_timeout: 5s"))
    r = subprocess.run([promtool, "check", "config", str(tmp_path / "bad.yml")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    for bad in (dict(sdn_targets=["no-port"]), dict(sdn_targets=[]), dict(sdn_targets=["h:1"], scrape_interval="1x")):
        with pytest.raises(ValueError):
            scrape_config(**bad)


def test_prometheus_config_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdn_dist.training.prometheus_config", "--sdn", "127.0.0.1:9400",
                        "--ray", "127.0.0.1:8080", "--interval", "5s"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    conf = yaml.safe_load(r.stdout)
    assert conf["global"]["scrape_interval"] == "5s"
    assert {j["job_name"]: j["static_configs"][0]["targets"] for j in conf["scrape_configs"]} == \
        {"sdn-dist": ["127.0.0.1:9400"], "ray": ["127.0.0.1:8080"]}


# ---------------------------------------------------------------------------------------------
# the Grafana dashboard and the docs

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed)."""
    q = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr)
    if q:
        expr = q.group(1)
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)   # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                                      # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                     # range windows
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)                                    # $__rate_interval, ...
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        before = e[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == "." or m.group().lower() in PROMQL_WORDS:
            continue                                                      # 1e3, 0.5, keywords
        if e[m.end():].lstrip().startswith("("):
            continue                                                      # a function
        names.add(m.group())
    return names


def test_promql_name_parser():
    assert promql_metric_names('histogram_quantile(0.9, sum by (le, rank) (rate(a_bucket{x=~"$r", y!="b c"}[$__rate_interval])))') == {"a_bucket"}
    assert promql_metric_names("time() - max by (run_id) (b_seconds{run_id=~\"$run_id\"}) / on (x) group_left c > 1e3") == {"b_seconds", "c"}
    assert promql_metric_names('label_values(d{run_id=~"$run_id"}, attempt)') == {"d"}


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target (rows' nested panels too) and query variable."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p['id']} {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))
    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


def test_dashboard_queries_name_only_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["panels"], list)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    known = exported_names(PrometheusExporter(MetricsConfig(), "r", "0").registry)
    queries = dashboard_queries(dash)
    used = set()
    for where, expr in queries:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known, f"{where}: {sorted(names - known)} not exported (expr {expr!r})"
        used |= names
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    # what the issue asks the dashboard to show
    for want in ("sdn_train_stage", "sdn_train_loss", "sdn_train_samples_per_second", "sdn_train_samples_total",
                 "sdn_data_wait_seconds_total", "sdn_data_samples_skipped_total",
                 "sdn_checkpoint_last_success_timestamp_seconds", "sdn_train_step_seconds_bucket"):
        assert want in used, f"the dashboard shows nothing of {want}"
    exprs = [e for _, e in queries]
    assert any("time() - " in e and "sdn_checkpoint_last_success_timestamp_seconds" in e for e in exprs), "checkpoint age"
    assert any(e.startswith("histogram_quantile(") and "sdn_train_step_seconds_bucket" in e for e in exprs)
    assert any('stage="1"' in e for e in exprs) and any('stage="2"' in e for e in exprs), "loss per level and stage"
    assert any("by (" in e and "reason" in e and "sdn_data_samples_skipped_total" in e for e in exprs)


def test_docs_describe_every_metric():
    text = DOCS.read_text()
    exp = PrometheusExporter(MetricsConfig(), "r", "0")
    for fam in exp.registry.collect():
        shown = fam.name + ("_total" if fam.type == "counter" else "")
        assert f"`{shown}`" in text, f"docs/metrics.md does not describe {shown}"
    for word in ("linger_seconds", "metrics-export-port", "0.0.0.0", "127.0.0.1", "prometheus_config", "honor_labels"):
        assert word in text, word


# ---------------------------------------------------------------------------------------------
# slow tier: a real Prometheus scraping a real training run

class Prom:
    def __init__(self, url: str, sdn_port: int, proc: subprocess.Popen, log: Path):
        self.url, self.sdn_port, self.proc, self.log = url, sdn_port, proc, log

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        args = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(args)}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus on 127.0.0.1 (free port, own TSDB in tmp), scraping 127.0.0.1:<sdn_port> every 1 s."""
    binary = tool("prometheus")
    sdn_port, port = free_port(), free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(scrape_config_yaml([f"127.0.0.1:{sdn_port}"], scrape_interval="1s"))
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([binary, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d",
                                 "--log.level=warn"],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"prometheus not ready after 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Prom(url, sdn_port, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from sdn_dist.apps.synth.dataset import make_synth
    d = tmp_path_factory.mktemp("prom-shards")
    make_synth(out=str(d), train=32, test=8, size=32, per_shard=16, seed=0)
    return d


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for this dashboard with every variable on 'All' (allValue .*)."""
    for var, val in (("__rate_interval", "15s"), ("__interval", "2s"), ("__range", "10m"),
                     ("run_id", ".*"), ("attempt", ".*")):
        expr = expr.replace("${" + var + "}", val).replace("$" + var, val)
    assert "$" not in expr, expr
    return expr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_prometheus_scrapes_a_training_run(prometheus, shards, tmp_path):
    S1 = S2 = 200
    out = tmp_path / "run"
    args = [sys.executable, "-m", "sdn_dist", "train", "--preset", "debug", "--quiet",
            "--set", f"out={out}", "--set", f"data.train={shards}/train-*.tar", "--set", f"data.test={shards}/test-*.tar",
            "--set", f"stage1.steps={S1}", "--set", f"stage2.steps={S2}", "--set", "checkpoint.every=50",
            "--set", "run_id=prom-it", "--set", f"metrics.port={prometheus.sdn_port}",
            "--set", "metrics.linger_seconds=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", SDN_ATTEMPT="7", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "train.log"
    samples: list[tuple[float, float]] = []     # (query time, sdn_train_samples_total) while running
    stages: set[str] = set()
    stage_values: set[float] = set()
    final_at = None                              # a query time at which Prometheus had the final step
    with open(log, "wb") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            now = time.time()
            stage_values |= {float(r["value"][1]) for r in prometheus.query('sdn_train_stage{job="sdn-dist"}', now)}
            for r in prometheus.query('sdn_train_samples_total{job="sdn-dist"}', now):
                if not samples or float(r["value"][1]) != samples[-1][1]:
                    samples.append((now, float(r["value"][1])))
            stages |= {r["metric"]["stage"] for r in prometheus.query("count by (stage) (sdn_train_loss)", now)}
            if any(float(r["value"][1]) == S1 + S2 for r in prometheus.query("sdn_train_step", now)):
                final_at = now
            time.sleep(0.5)
        rc = proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, log.read_text()[-4000:]
    tail = f"\ntrain log:\n{log.read_text()[-2000:]}\nprometheus log:\n{prometheus.log.read_text()[-2000:]}"

    assert stage_values, "Prometheus never had sdn_train_stage" + tail
    assert stage_values <= {1.0, 2.0}, stage_values
    assert len(samples) >= 2 and samples[-1][1] > samples[0][1], \
        f"sdn_train_samples_total did not increase between observations: {samples}" + tail
    # by the end: the loss of both stages (range queries ignore the staleness after the run ended)
    ended = {r["metric"]["stage"] for r in prometheus.query('count by (stage) (last_over_time(sdn_train_loss{level="total"}[10m]))')}
    assert ended == {"1", "2"}, f"sdn_train_loss stages {ended} (seen while running: {stages})" + tail
    assert {r["metric"]["level"] for r in prometheus.query('last_over_time(sdn_train_loss{stage="2"}[10m])')} > {"total"}
    # the linger let Prometheus scrape the final values
    assert final_at is not None, "Prometheus never scraped the final step (metrics.linger_seconds)" + tail
    assert "metrics.linger_seconds" in log.read_text(), "the driver did not linger after the run"
    (last,) = prometheus.query("last_over_time(sdn_train_samples_total[10m])")
    assert float(last["value"][1]) == (S1 + S2) * 8 and last["metric"]["run_id"] == "prom-it" \
        and last["metric"]["attempt"] == "7", last
    (age,) = prometheus.query("time() - sdn_checkpoint_last_success_timestamp_seconds", final_at)
    assert 0 <= float(age["value"][1]) < 120, age
    assert {r["metric"]["rank"] for r in prometheus.query("sdn_train_step_seconds_count", final_at)} == {"0"}

    # every dashboard query is valid PromQL on a real Prometheus and has data for this run
    dash = json.loads(DASHBOARD.read_text())
    empty = [(where, e) for where, e in dashboard_queries(dash) if not e.startswith("label_values(")
             and not prometheus.query(grafana_to_promql(e), final_at)]
    assert not empty, f"dashboard queries with no data: {empty}"
    assert {r["metric"]["run_id"] for r in prometheus.query("sdn_train_step", final_at)} == {"prom-it"}


def _step(step, t, seconds=1.0, window=1, rank=0):
    return {"step": step, "stage": 1, "rank": rank, "time": t, "step_seconds": seconds, "window_steps": window}


def test_goodput_and_recovery_from_the_records(tmp_path):
    """training/recovery.py on a made-up history: an attempt preempted at step 4, a rerun that
    resumes from step 4 and loses a worker after step 6 (Ray Train restarts the group from step
    5). Recovery = first step after the fault - last record before it; goodput = steps x median
    step time / wall time since the first attempt's start."""
    from sdn_dist.training.recovery import RunClock, format_summary, median_step_seconds
    assert median_step_seconds([(1, 9.0), (3, 1.0), (1, 2.0)]) == 1.0        # weighed by steps
    assert median_step_seconds([(2, 1.0), (2, 3.0)]) == 1.0 and median_step_seconds([]) is None
    out = tmp_path / "run"
    out.mkdir()
    first = [{"event": "attempt", "attempt": "a1", "time": 100.0}, {"event": "start", "step": 0, "time": 101.0},
             {"event": "first_step", "step": 1, "time": 102.0}]
    steps = [_step(s, 101.0 + s) for s in range(1, 5)] + [_step(s, 101.0 + s, rank=1) for s in range(1, 5)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + '{"step": 5, "ti\n')
    (out / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first + [
        {"event": "checkpoint", "step": 4, "time": 105.5}, {"event": "preempted", "step": 4, "time": 106.0}]))
    clock = RunClock.from_run_dir(str(out), "a2", started=200.0)
    assert clock.attempt_event()["time"] == 200.0
    got = clock.observe([{"event": "start", "step": 4, "time": 210.0}, {"event": "first_step", "step": 5, "time": 212.5},
                         _step(5, 212.5, seconds=2.5), _step(6, 213.5)])
    assert [(r["event"], r["cause"], r["seconds"], r["step"], r["first_step"]) for r in got] == [
        ("recovered", "preempted", 106.5, 4, 5)]                     # 212.5 - 106.0 (the preemption)
    assert clock.observe([{"event": "start", "step": 5, "time": 230.0}, _step(6, 232.0, seconds=2.0)]) == []
    (rec,) = clock.observe([{"event": "first_step", "step": 6, "time": 232.0}])
    assert (rec["cause"], rec["seconds"], rec["step"]) == ("worker_restart", 18.5, 5)   # 232.0 - 213.5
    s = clock.summary(now=250.0)
    # 6 steps (step 6 done twice counts once) x median 1.0 s / (250 - 100) s since attempt a1 started
    assert (s["event"], s["steps"], s["median_step_seconds"], s["wall_seconds"]) == ("summary", 6, 1.0, 150.0)
    assert s["goodput"] == pytest.approx(6 / 150) and (s["recoveries"], s["recovery_seconds"]) == (2, 125.0)
    assert format_summary(s).startswith("goodput 0.040: 6 steps x 1 s median step / 150.0 s wall")
    # a rerun of a run whose previous attempt was lost without a preemption checkpoint: cause rerun
    (out / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    clock = RunClock.from_run_dir(str(out), "a3", started=300.0)
    (rec,) = clock.observe([{"event": "start", "step": 4, "time": 301.0}, {"event": "first_step", "step": 5, "time": 303.0}])
    assert (rec["cause"], rec["seconds"]) == ("rerun", 198.0)        # 303.0 - 105.0, the last step record
    # a rerun of a run that had finished (more steps asked for) recovers from no fault
    (out / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first + [
        {"event": "final", "step": 4, "rank": 0, "time": 107.0}]))
    clock = RunClock.from_run_dir(str(out), "a4", started=400.0)
    assert clock.observe([{"event": "start", "step": 4, "time": 401.0}, {"event": "first_step", "step": 5, "time": 403.0}]) == []
    # a fresh start recovers from nothing
    assert RunClock.from_run_dir(str(tmp_path / "new"), "b", 0.0).observe(
        [{"event": "start", "step": 0, "time": 1.0}, {"event": "first_step", "step": 1, "time": 2.0}]) == []


def test_recovery_and_goodput_metrics():
    exp = PrometheusExporter(MetricsConfig(), "r", "a")
    get = exp.registry.get_sample_value
    L = {"run_id": "r", "attempt": "a"}
    assert get("sdn_train_recovery_seconds_count", {**L, "cause": "worker_restart"}) == 0
    exp.log({"event": "recovered", "seconds": 7.5, "cause": "worker_restart", "step": 5, "time": 1.0})
    exp.log({"event": "recovered", "seconds": 40.0, "cause": "preempted", "step": 9, "time": 2.0})
    assert get("sdn_train_recovery_seconds_count", {**L, "cause": "worker_restart"}) == 1
    assert get("sdn_train_recovery_seconds_bucket", {**L, "cause": "worker_restart", "le": "10.0"}) == 1
    assert get("sdn_train_recovery_seconds_sum", {**L, "cause": "preempted"}) == 40.0
    exp.log({"event": "summary", "goodput": 0.875, "steps": 10, "time": 3.0})
    assert get("sdn_train_goodput", L) == 0.875


def test_checkpoint_upload_records_become_upload_metrics():
    """What the Checkpointer reports from its upload threads reaches sdn_checkpoint_upload_seconds
    (per rank), sdn_checkpoint_failures_total, and the held-up time sdn_checkpoint_blocked_seconds."""
    exp = PrometheusExporter(MetricsConfig(), "r", "a")
    exp.log({"event": "checkpoint_upload", "rank": 1, "step": 4, "stage": 1, "upload_seconds": 2.0, "retries": 0, "ok": True})
    exp.log({"event": "checkpoint_upload", "rank": 0, "step": 8, "stage": 1, "upload_seconds": 9.0, "retries": 5, "ok": False})
    exp.log({"event": "checkpoint", "step": 4, "stage": 1, "rank": 0, "checkpoint_seconds": 3.0, "blocked_seconds": 0.25})
    get = exp.registry.get_sample_value
    L = {"run_id": "r", "attempt": "a"}
    assert get("sdn_checkpoint_upload_seconds_count", dict(L, rank="1")) == 1
    assert get("sdn_checkpoint_upload_seconds_sum", dict(L, rank="1")) == 2.0
    assert get("sdn_checkpoint_upload_seconds_count", dict(L, rank="0")) is None   # a failed upload is no duration
    assert get("sdn_checkpoint_failures_total", dict(L, rank="0")) == 1
    assert get("sdn_checkpoint_blocked_seconds_sum", L) == 0.25
    assert get("sdn_checkpoint_duration_seconds_sum", L) == 3.0


def test_the_collector_drains_records_in_the_order_their_ranks_made_them():
    """The collector is an async actor, whose calls Ray may run out of their sending order: under
    load a rank's step 88 reached metrics.jsonl before its step 87. A drain is in making order."""
    import asyncio

    from sdn_dist.training.collector import RecordCollector
    collector = RecordCollector.__ray_actor_class__()   # the actor's own class, without Ray
    arrived = [[{"step": 86, "rank": 0, "time": 10.0}], [{"step": 88, "rank": 0, "time": 10.2}],
               [{"event": "checkpoint", "step": 88, "time": 10.21}], [{"step": 87, "rank": 0, "time": 10.1}]]
    for records in arrived:
        asyncio.run(collector.report(records))
    assert [(r.get("event"), r["step"]) for r in asyncio.run(collector.drain())] == [
        (None, 86), (None, 87), (None, 88), ("checkpoint", 88)]
