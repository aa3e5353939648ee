"""Check rendered Kubernetes manifests (``kubectl kustomize deploy/k8s/overlays/<x>``) for what the
schema cannot say: the "restricted" Pod Security profile on every pod and container, liveness and
readiness probes, resource requests and a memory limit, no kustomize image placeholder left, a
PodDisruptionBudget over the workers, and the workers' metrics port and scrape annotations.

    python deploy/check_manifests.py rendered.yaml [...]     exit 0: fine; 1: one line a problem

Used by ``.ci/deploy-check`` and ``tests/test_deploy.py``; needs PyYAML only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

#: the image name the manifests use and every overlay's ``images:`` replaces
PLACEHOLDER_IMAGE = "xflow"
METRICS_PORT = 9108
METRICS_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(METRICS_PORT),
    "prometheus.io/path": "/metrics",
}
# https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted
_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
_SECCOMP = {"RuntimeDefault", "Localhost"}


def image_name(image: str) -> str:
    """``registry:5000/team/app`` of ``registry:5000/team/app:1.2@sha256:...``."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The pod spec of a workload (none for other kinds)."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Pod":
        yield spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield spec["template"]["spec"]
    elif kind == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]


def _pod_problems(where: str, pod: dict[str, Any]) -> Iterator[str]:
    sc = pod.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True:
        yield f"{where}: securityContext.runAsNonRoot is not true"
    if sc.get("runAsUser") == 0:
        yield f"{where}: securityContext.runAsUser is 0"
    if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        yield f"{where}: securityContext.seccompProfile.type is not RuntimeDefault"
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            yield f"{where}: {field}"
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            yield f"{where}: volume {volume.get('name')!r} of a type the restricted profile forbids: {sorted(kinds)}"
    for key, long_running in (("initContainers", False), ("containers", True)):
        for c in pod.get(key) or []:
            yield from _container_problems(f"{where} container {c.get('name')!r}", c, long_running=long_running)


def _container_problems(where: str, c: dict[str, Any], *, long_running: bool) -> Iterator[str]:
    csc = c.get("securityContext") or {}
    caps = csc.get("capabilities") or {}
    if csc.get("allowPrivilegeEscalation") is not False:
        yield f"{where}: securityContext.allowPrivilegeEscalation is not false"
    if caps.get("drop") != ["ALL"]:
        yield f"{where}: securityContext.capabilities.drop is not [ALL]"
    if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
        yield f"{where}: adds capabilities {caps['add']}"
    if csc.get("privileged"):
        yield f"{where}: privileged"
    if csc.get("runAsNonRoot") is False or csc.get("runAsUser") == 0:
        yield f"{where}: runs as root"
    if "seccompProfile" in csc and csc["seccompProfile"].get("type") not in _SECCOMP:
        yield f"{where}: seccompProfile {csc['seccompProfile']}"
    resources = c.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    if not (requests.get("cpu") and requests.get("memory") and limits.get("memory")):
        yield f"{where}: needs resources.requests.cpu, requests.memory and limits.memory"
    if long_running and not (c.get("livenessProbe") and c.get("readinessProbe")):
        yield f"{where}: needs a livenessProbe and a readinessProbe"
    image = str(c.get("image") or "")
    if not image or image_name(image) == PLACEHOLDER_IMAGE:
        yield f"{where}: image {image!r} is not set by the overlay's images:"


def _workers_problems(docs: list[dict[str, Any]]) -> Iterator[str]:
    workers = [d for d in docs if d.get("kind") == "Deployment" and d["metadata"]["name"] == "xflow-workers"]
    if len(workers) != 1:
        yield f"expected one Deployment xflow-workers, found {len(workers)}"
        return
    (deployment,) = workers
    selector = deployment["spec"]["selector"]["matchLabels"]
    if not any(
        d.get("kind") == "PodDisruptionBudget" and (d["spec"].get("selector") or {}).get("matchLabels") == selector
        for d in docs
    ):
        yield "xflow-workers: no PodDisruptionBudget selects its pods"
    template = deployment["spec"]["template"]
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    for key, value in METRICS_ANNOTATIONS.items():
        if annotations.get(key) != value:
            yield f"xflow-workers: pod annotation {key} is {annotations.get(key)!r}, not {value!r}"
    (worker,) = [c for c in template["spec"]["containers"] if c["name"] == "worker"]
    ports = {p.get("name"): p.get("containerPort") for p in worker.get("ports") or []}
    if ports.get("metrics") != METRICS_PORT:
        yield f"xflow-workers: no containerPort named metrics = {METRICS_PORT}"
    env = {e["name"]: e.get("value") for e in worker.get("env") or []}
    if env.get("XFLOW_METRICS_PORT") != str(METRICS_PORT):
        yield f"xflow-workers: env XFLOW_METRICS_PORT is not {METRICS_PORT}"


def problems(docs: list[dict[str, Any]]) -> list[str]:
    """What is wrong with one rendered overlay (its documents); empty when nothing is."""
    found: list[str] = []
    for doc in docs:
        for pod in pod_specs(doc):
            found.extend(_pod_problems(f"{doc['kind']}/{doc['metadata']['name']}", pod))
    found.extend(_workers_problems(docs))
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    failed = False
    for name in argv:
        docs = [d for d in yaml.safe_load_all(Path(name).read_text(encoding="utf-8")) if d]
        for problem in problems(docs):
            failed = True
            print(f"{name}: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
