"""deploy/: what a restricted cluster and a careful compose file require of every workload, the
kustomize layout (a base, a dev and a prod overlay), and the pinned image build.

The rendering tests need kubectl; they skip without it, unless ``XFLOW_REQUIRE_KUBECTL=1`` (CI),
which makes them fail instead. ``.ci/deploy-check`` adds the schema validations (Kubernetes and
compose), which need the network-free tools kubernetes-validate and check-jsonschema.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = ("dev", "prod")
PLACEHOLDER = "xflow"  # the image name of the manifests, which each overlay's images: replaces
_REQUIRE_KUBECTL = os.environ.get("XFLOW_REQUIRE_KUBECTL", "") not in ("", "0")


def _check_manifests() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_manifests", DEPLOY / "check_manifests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(directory: Path) -> dict[str, Any]:
    (doc,) = _load(directory / "kustomization.yaml")
    assert doc["kind"] == "Kustomization"
    return doc


def _resource_files(directory: Path) -> list[Path]:
    """The files a kustomization lists as resources (not the patches, not other kustomizations)."""
    listed = [directory / r for r in _kustomization(directory).get("resources") or []]
    return [p for p in listed if p.is_file()]


def _resources(directory: Path) -> list[dict[str, Any]]:
    return [d for f in _resource_files(directory) for d in _load(f)]


def _manifests() -> list[dict[str, Any]]:
    """Every full resource of the base and the overlays (as written, before kustomize)."""
    return [d for directory in (BASE, *(K8S / "overlays" / o for o in OVERLAYS)) for d in _resources(directory)]


def _workloads() -> list[dict[str, Any]]:
    return [d for d in _manifests() if d["kind"] in ("Deployment", "Job")]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def test_the_layout_is_a_base_and_two_overlays_and_the_flat_files_are_gone() -> None:
    assert not list(K8S.glob("*.yaml")), "the manifests live in base/ and overlays/"
    assert {f.name for f in _resource_files(BASE)} >= {"configmap.yaml", "workers.yaml"}
    for overlay in OVERLAYS:
        assert "../../base" in _kustomization(K8S / "overlays" / overlay)["resources"], overlay


def test_every_pod_meets_the_restricted_pod_security_profile() -> None:
    workloads = _workloads()
    assert {w["metadata"]["name"] for w in workloads} >= {
        "xflow-workers", "xflow-producer", "xflow-redis", "xflow-simulator",
    }  # fmt: skip
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        name = w["metadata"]["name"]
        sc = pod.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, name
        assert (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", name
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), name
        for c in _containers(w):
            csc = c.get("securityContext") or {}
            assert csc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert (csc.get("capabilities") or {}).get("drop") == ["ALL"], (name, c["name"])
            assert not csc.get("privileged"), (name, c["name"])
            resources = c["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], (name, c["name"])
            assert resources["limits"]["memory"], (name, c["name"])
    namespace = next(d for d in _resources(BASE) if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_container_has_probes() -> None:
    for w in _workloads():  # the Deployments and the producer Job
        for c in _containers(w):
            assert c.get("readinessProbe") and c.get("livenessProbe"), (w["metadata"]["name"], c["name"])


def test_workers_have_a_disruption_budget_and_the_job_cleans_up() -> None:
    docs = _manifests()
    pdb = next(d for d in _resources(BASE) if d["kind"] == "PodDisruptionBudget")
    workers = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "xflow-workers")
    assert pdb["spec"]["selector"]["matchLabels"] == workers["spec"]["selector"]["matchLabels"]
    assert pdb["spec"].get("maxUnavailable") or pdb["spec"].get("minAvailable")
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_workers_serve_metrics_to_scrape() -> None:
    workers = next(d for d in _resources(BASE) if d["kind"] == "Deployment")
    template = workers["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9108",
        "prometheus.io/path": "/metrics",
    }
    (worker,) = template["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9108, "protocol": "TCP"} in worker["ports"]
    assert {"name": "XFLOW_METRICS_PORT", "value": "9108"} in worker["env"]
    # the optional PodMonitor (not in any kustomization: its CRD is not in the Kubernetes schema)
    (monitor,) = _load(K8S / "overlays" / "prod" / "optional" / "podmonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"] == workers["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for directory in (BASE, *(K8S / "overlays" / o for o in OVERLAYS)):
        assert not any("podmonitor" in str(r).lower() for r in _kustomization(directory).get("resources") or [])


def test_the_producer_job_and_the_demo_services_are_only_in_the_dev_overlay() -> None:
    assert not [d for d in _resources(BASE) if d["kind"] == "Job"], "the base has no Job"
    assert not [d for d in _resources(K8S / "overlays" / "prod") if d["kind"] in ("Job", "Deployment")]
    dev = {(d["kind"], d["metadata"]["name"]) for d in _resources(K8S / "overlays" / "dev")}
    assert dev >= {("Job", "xflow-producer"), ("Deployment", "xflow-redis"), ("Deployment", "xflow-simulator")}


def test_the_image_is_named_only_in_the_overlays_images() -> None:
    assert "images" not in _kustomization(BASE)
    names = set()
    for overlay in OVERLAYS:
        (entry,) = [i for i in _kustomization(K8S / "overlays" / overlay)["images"] if i["name"] == PLACEHOLDER]
        assert entry["newName"] and entry["newTag"], overlay
        names.add(entry["newName"])
    for w in _workloads():
        for c in _containers(w):
            image = c["image"]
            if not image.startswith("redis:"):  # the dev overlay's Redis: a public image of its own
                assert image == PLACEHOLDER, (w["metadata"]["name"], image)
    # and written nowhere else in deploy/k8s
    for path in K8S.rglob("*"):
        if path.is_file() and path.name != "kustomization.yaml":
            text = path.read_text()
            assert not [n for n in names if n in text], path
    for overlay in OVERLAYS:  # once in the kustomization (its comments may show a docker build command)
        text = yaml.safe_dump(_kustomization(K8S / "overlays" / overlay))
        for n in names:
            assert text.count(n) <= 1, (overlay, n)


def test_secrets_come_from_an_uncommitted_env_file_with_a_committed_example() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "deploy/k8s/overlays/*/secrets.env" in ignored
    for overlay in OVERLAYS:
        directory = K8S / "overlays" / overlay
        (generator,) = _kustomization(directory)["secretGenerator"]
        assert generator == {"name": "xflow-secrets", "envs": ["secrets.env"]}, overlay
        lines = [ln for ln in (directory / "secrets.env.example").read_text().splitlines() if ln and ln[0] != "#"]
        assert {ln.split("=", 1)[0] for ln in lines} == {"XFLOW_REDIS_URL", "XFLOW_BROKER_URL", "XFLOW_API_KEY"}
    committed = [p for p in K8S.rglob("*.yaml") if any(d.get("kind") == "Secret" for d in _load(p))]
    assert not committed, "secrets come from the secretGenerator, not from a committed manifest"
    if (ROOT / ".git").exists() and shutil.which("git"):
        for overlay in OVERLAYS:
            path = f"deploy/k8s/overlays/{overlay}/secrets.env"
            done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
            assert done.returncode == 0, f"{path} is not git-ignored"


def test_prod_points_at_an_external_redis_and_provider_with_more_workers() -> None:
    prod = K8S / "overlays" / "prod"
    (config,) = _load(prod / "configmap.yaml")
    assert config["kind"] == "ConfigMap" and config["metadata"]["name"] == "xflow-config"
    assert "xflow-simulator" not in config["data"]["XFLOW_PROVIDER_URL"]
    assert "xflow-redis" not in (prod / "secrets.env.example").read_text()
    (patch,) = _load(prod / "workers.yaml")
    base_workers = next(d for d in _resources(BASE) if d["kind"] == "Deployment")
    assert patch["spec"]["replicas"] > base_workers["spec"]["replicas"]
    (dev_config,) = _load(K8S / "overlays" / "dev" / "configmap.yaml")
    assert dev_config["data"]["XFLOW_PROVIDER_URL"] == "http://xflow-simulator:8080/v1"


def test_the_simulator_starts_from_its_new_module() -> None:
    files = [DEPLOY / "Dockerfile", DEPLOY / "docker-compose.yml", *K8S.rglob("*.yaml")]
    starts = [f for f in files if "xflow_dist.tools.simulator" in f.read_text()]
    assert {f.name for f in starts} >= {"docker-compose.yml", "demo.yaml"}
    assert not [f for f in files if re.search(r"xflow_dist\.simulator\b", f.read_text())]


def test_compose_builds_the_image_it_runs_waits_for_health_and_keeps_the_key_out() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
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
    workers = services["workers"]
    assert workers["environment"]["XFLOW_METRICS_PORT"] == "9108"
    assert "9108" in [str(p) for p in workers["expose"]]
    assert workers["environment"]["XFLOW_API_KEY"] == "${XFLOW_API_KEY:-}"
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".git" in ignored and "deploy/k8s" in ignored and "**/*.env" in ignored
    assert "deploy" not in ignored and "deploy/constraints.txt" not in ignored  # the build needs it


# ------------------------------------------------------------------------------------------
# The image: non-root, a health check, a pinned build, tiktoken's encodings inside.

IMAGE_EXTRAS = ("celery", "httpx", "metrics")
IMAGE_PACKAGES = ("tiktoken", "aiohttp")  # token estimates; the simulated provider


def test_the_image_runs_as_a_user_checks_health_and_has_tiktokens_encodings() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"-m\", \"workers.health\"\]", text, flags=re.MULTILINE)
    assert "TIKTOKEN_CACHE_DIR=/opt/tiktoken" in text  # an ENV: the build fills it, the workers read it
    assert "'cl100k_base', 'o200k_base'" in text and "tiktoken.get_encoding" in text


def test_the_image_installs_from_the_constraints_file_only() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    installs = re.findall(r"pip install ([^;&\n]*(?:\\\n[^;&\n]*)*)", text)
    assert len(installs) == 2, installs  # the build backend, then the image's packages
    for command in installs:
        assert "--constraint /tmp/constraints.txt" in command and "--only-binary=:all:" in command, command
    assert f'[{",".join(IMAGE_EXTRAS)}]" {" ".join(IMAGE_PACKAGES)}' in text
    assert "COPY deploy/constraints.txt /tmp/constraints.txt" in text
    assert "--no-build-isolation" in text  # hatchling from the constraints, not fetched unpinned


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>=!~;\s]", version), f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_constraints_pin_what_the_image_installs_within_pyprojects_ranges() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    pins = _constraints()
    assert canonicalize_name("xflow-dist") not in pins
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in IMAGE_EXTRAS for r in extras[extra]]
    wanted += [Requirement(r) for r in pyproject["build-system"]["requires"]]
    # the packages the image adds by name: within every range an extra gives them
    wanted += [Requirement(r) for rs in extras.values() for r in rs if Requirement(r).name in IMAGE_PACKAGES]
    wanted += [Requirement(name) for name in IMAGE_PACKAGES]
    for req in wanted:
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            continue
        if req.marker is not None and not req.marker.evaluate({"python_version": "3.11", "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


# ------------------------------------------------------------------------------------------
# Rendering (kubectl kustomize): skipped without kubectl, unless XFLOW_REQUIRE_KUBECTL=1.


@pytest.fixture
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        if _REQUIRE_KUBECTL:
            pytest.fail("kubectl is not installed and XFLOW_REQUIRE_KUBECTL=1")
        pytest.skip("kubectl is not installed")
    return path


def _tree(tmp_path: Path, *, with_secrets: bool = True) -> Path:
    """A copy of deploy/k8s whose overlays' secrets.env are the committed examples (a real one
    in the checkout is not read), as .ci/deploy-check renders them."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
    if with_secrets:
        for overlay in OVERLAYS:
            directory = tree / "overlays" / overlay
            shutil.copy(directory / "secrets.env.example", directory / "secrets.env")
    return tree


def _render(kubectl: str, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_passes_the_checks(kubectl: str, tmp_path: Path, overlay: str) -> None:
    done = _render(kubectl, _tree(tmp_path) / "overlays" / overlay)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert _check_manifests().problems(docs) == []
    kinds = sorted(d["kind"] for d in docs)
    if overlay == "dev":
        assert kinds.count("Deployment") == 3 and kinds.count("Job") == 1 and kinds.count("Service") == 2
    else:
        assert kinds.count("Deployment") == 1 and "Job" not in kinds and "Service" not in kinds
    assert {"ConfigMap", "Secret", "Namespace", "PodDisruptionBudget"} <= set(kinds)
    # one namespace for everything, and the image of the overlay's images:
    namespace = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}
    (entry,) = _kustomization(K8S / "overlays" / overlay)["images"]
    image = f"{entry['newName']}:{entry['newTag']}"
    for d in docs:
        for c in d["spec"]["template"]["spec"]["containers"] if d["kind"] in ("Deployment", "Job") else []:
            assert c["image"] == image or c["image"].startswith("redis:"), c["image"]
    # the generated secret's name (a hash of its content) is the one the pods read
    secret = next(d for d in docs if d["kind"] == "Secret")["metadata"]["name"]
    assert secret.startswith("xflow-secrets-")
    workers = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "xflow-workers")
    refs = [r for r in _containers(workers)[0]["envFrom"] if "secretRef" in r]
    assert refs == [{"secretRef": {"name": secret}}]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    (patch,) = _load(K8S / "overlays" / overlay / "configmap.yaml")
    assert config["XFLOW_PROVIDER_URL"] == patch["data"]["XFLOW_PROVIDER_URL"]


def test_the_base_renders_without_a_job(kubectl: str, tmp_path: Path) -> None:
    done = _render(kubectl, _tree(tmp_path) / "base")
    assert done.returncode == 0, done.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(done.stdout) if d]
    assert "Job" not in kinds and kinds.count("Deployment") == 1 and "PodDisruptionBudget" in kinds


def test_an_overlay_without_its_secrets_file_does_not_render(kubectl: str, tmp_path: Path) -> None:
    done = _render(kubectl, _tree(tmp_path, with_secrets=False) / "overlays" / "dev")
    assert done.returncode != 0 and "secrets.env" in done.stderr
