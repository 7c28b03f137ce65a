"""The alert rules: promtool's unit tests pass, and fail when any alert's expression is broken;
the PrometheusRule in k8s/base holds the same rules as the plain file and validates against the
Prometheus operator's CRD; the metrics the rules read are the ones the exporter serves.

    .venv/bin/python -m pytest tests/test_alerts.py -q

promtool comes from `bash scripts/setup.sh` (Debian's `prometheus` package); without it these tests
fail and say so (never skip).
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from test_manifests import crd_errors, only, render
from test_metrics import tool

from sdn_dist.config import MetricsConfig
from sdn_dist.training.metrics import PrometheusExporter

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "k8s" / "prometheus" / "sdn-alerts.rules.yaml"
UNIT = ROOT / "tests" / "prometheus" / "sdn-alerts.test.yaml"
DOCS = ROOT / "docs" / "metrics.md"
ALERTS = ["SdnTrainingStalled", "SdnLossNotFinite", "SdnDataWaitDominates", "SdnRestartsRising",
          "SdnCheckpointUploadsFailing"]


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def promtool_test(rules_doc: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """`promtool test rules` of the unit tests against ``rules_doc`` (written beside a copy of them)."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules_doc, sort_keys=False))
    unit = yaml.safe_load(UNIT.read_text())
    unit["rule_files"] = ["rules.yaml"]
    (tmp_path / "unit.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    return subprocess.run([tool("promtool"), "test", "rules", "unit.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


def test_rules_pass_promtool_check_and_unit_tests():
    r = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 5 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([tool("promtool"), "test", "rules", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing_and_quiet():
    unit = yaml.safe_load(UNIT.read_text())
    cases = [c for t in unit["tests"] for c in t["alert_rule_test"]]
    assert [r["alert"] for r in rules()] == ALERTS
    for name in ALERTS:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no case where it stays quiet"


# A broken expression either never fires or fires on everything: the unit tests must catch both.
MUTATIONS = {"never fires": lambda expr: "vector(1) > 2",
             "always fires": lambda expr: '{__name__=~"sdn_.+"}'}


@pytest.mark.parametrize("alert", ALERTS)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_broken_expression_fails_the_unit_tests(alert, mutation, tmp_path):
    doc = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r["alert"] == alert]
    rule["expr"] = MUTATIONS[mutation](rule["expr"])
    r = promtool_test(doc, tmp_path)
    assert r.returncode != 0, f"{alert} with expr {rule['expr']!r}: promtool's unit tests still pass"
    assert alert in r.stdout + r.stderr


def test_the_mutation_harness_passes_the_unmodified_rules(tmp_path):
    """So that a mutation fails for its mutation, not for the copying."""
    r = promtool_test(yaml.safe_load(RULES.read_text()), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_for_a_severity_and_a_runbook_in_the_docs():
    docs = DOCS.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", docs, re.M)}
    for r in rules():
        assert re.fullmatch(r"\d+[smh]", str(r.get("for", ""))), f"{r['alert']}: no for:"
        assert r["labels"]["severity"] in ("page", "warning")
        page, anchor = r["annotations"]["runbook"].split("#")
        assert page == "docs/metrics.md" and anchor in anchors, f"{r['alert']}: no runbook heading #{anchor}"


def test_rules_read_only_metrics_the_exporter_serves():
    """A renamed metric would leave an alert silent forever: every sdn_* name in an expression is
    one the exporter exposes (a counter's _total, a histogram's _sum ...)."""
    exp = PrometheusExporter(MetricsConfig(), run_id="r", attempt="a")
    served = set()
    for fam in exp.registry.collect():
        served |= {"counter": {fam.name + "_total"}, "histogram": {fam.name + s for s in ("_sum", "_count", "_bucket")},
                   "gauge": {fam.name}}.get(fam.type, {fam.name})
    for r in rules():
        used = set(re.findall(r"\bsdn_[a-z_]+", r["expr"]))
        assert used and used <= served, f"{r['alert']}: {sorted(used - served)} not served"


def test_counters_the_alerts_need_exist_before_their_first_increase():
    """increase() sees no rise from an absent series to 1: the stall alert needs the sample
    counter at 0 before the first step, the upload alert each rank's failure counter at 0."""
    exp = PrometheusExporter(MetricsConfig(), run_id="r", attempt="a")
    L = {"run_id": "r", "attempt": "a"}
    assert exp.registry.get_sample_value("sdn_train_samples_total", L) == 0
    exp.log({"step": 1, "stage": 1, "rank": 1, "pid": 11, "loss": 1.0, "step_seconds": 0.1})
    assert exp.registry.get_sample_value("sdn_checkpoint_failures_total", {**L, "rank": "1"}) == 0


# ---------------------------------------------------------------------------------- Kubernetes

@pytest.mark.parametrize("path", ["k8s/base", "k8s/overlays/cpu", "k8s/overlays/s3"])
def test_prometheus_rule_holds_the_plain_files_rules(path):
    rule = only(render(path), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), (
        "k8s/base/prometheusrule.yaml and k8s/prometheus/sdn-alerts.rules.yaml differ: copy the groups across")


def test_prometheus_rule_validates_against_the_crd():
    rule = only(render("k8s/base"), "PrometheusRule")
    assert crd_errors(rule) == []
    bad = copy.deepcopy(rule)
    bad["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    assert any("5 minutes" in e for e in crd_errors(bad)), "a malformed for: passed the CRD"
    bad = copy.deepcopy(rule)
    bad["spec"]["groups"][0]["rules"][0]["severity"] = "page"
    assert any("severity" in e for e in crd_errors(bad)), "an unknown field passed the CRD"
