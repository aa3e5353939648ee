"""deploy/: what a restricted cluster and a careful compose file require of every workload."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


def _manifests() -> list[dict[str, Any]]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _workloads() -> list[dict[str, Any]]:
    return [d for d in _manifests() if d["kind"] in ("Deployment", "Job")]


def test_every_pod_meets_the_restricted_pod_security_profile() -> None:
    workloads = _workloads()
    assert {w["metadata"]["name"] for w in workloads} >= {"xflow-workers", "xflow-producer", "xflow-redis"}
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        name = w["metadata"]["name"]
        sc = pod.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, name
        assert (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", name
        for c in pod["containers"]:
            csc = c.get("securityContext") or {}
            assert csc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert (csc.get("capabilities") or {}).get("drop") == ["ALL"], (name, c["name"])
            assert not csc.get("privileged"), (name, c["name"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], (name, c["name"])


def test_every_long_running_container_has_probes() -> None:
    for w in _workloads():
        if w["kind"] != "Deployment":
            continue
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert c.get("readinessProbe") and c.get("livenessProbe"), (w["metadata"]["name"], c["name"])


def test_workers_have_a_disruption_budget_and_the_job_cleans_up() -> None:
    docs = _manifests()
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    workers = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "xflow-workers")
    assert pdb["spec"]["selector"]["matchLabels"] == workers["spec"]["selector"]["matchLabels"]
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_compose_builds_the_image_it_runs_waits_for_health_and_keeps_the_key_out() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    for name, service in services.items():
        if service.get("image", "").startswith("xflow-dist"):
            assert service.get("build"), f"{name} uses the built image but does not build it"
        if name != "producer":  # a one-shot job
            assert service.get("healthcheck"), name
        for dep, cond in (service.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", (name, dep)
    env = compose["x-xflow-env"]
    assert env["XFLOW_API_KEY"] == "${XFLOW_API_KEY:-}", "the API key comes from the environment"
    assert (ROOT / ".dockerignore").read_text().count(".git") >= 1


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_kustomization_renders() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(done.stdout) if d]
    assert kinds.count("Deployment") == 3 and "PodDisruptionBudget" in kinds and "Job" in kinds
