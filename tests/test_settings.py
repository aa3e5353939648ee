"""``xflow_dist.settings``: ``XFLOW_*`` variables into budgets and policies, ``xflow settings``, and
the deployment manifests, whose every ``XFLOW_*`` variable must be one the fleet reads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from xflow_dist import Budget, ConfigurationError, CooldownPolicy, Limiter

pytest.importorskip("pydantic_settings")
from xflow_dist.settings import Settings, mask_url

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No XFLOW_* variable of the caller's (CI sets some) leaks into these tests."""
    for key in list(os.environ):
        if key.startswith("XFLOW_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_defaults() -> None:
    s = Settings.load()
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.get_budget() == Budget("default")
    assert s.cooldown_policy() == CooldownPolicy()
    assert s.celery.max_wait == 2.0 and s.celery.max_countdown is None
    assert s.all_budgets() == [Budget("default")]
    assert s.outage == "local"


def test_nested_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("XFLOW_REDIS_URL", "redis://redis:6379/2")
    clean_env.setenv("XFLOW_BUDGET__NAME", "openai:team-a")
    clean_env.setenv("XFLOW_BUDGET__RPM", "10000")
    clean_env.setenv("XFLOW_BUDGET__TPM", "2000000")
    clean_env.setenv("XFLOW_BUDGET__MAX_CONCURRENCY", "64")
    clean_env.setenv("XFLOW_BUDGET__BURST", "60")
    clean_env.setenv("XFLOW_COOLDOWN__BASE", "2")
    clean_env.setenv("XFLOW_COOLDOWN__MAX_BACKOFF", "30")
    clean_env.setenv("XFLOW_CELERY__MAX_WAIT", "0.5")
    clean_env.setenv("XFLOW_OUTAGE", "closed")
    clean_env.setenv("XFLOW_REQUIRE_REDIS", "1")  # another tool's variable: ignored
    s = Settings.load()
    assert s.redis_url == "redis://redis:6379/2"
    assert s.get_budget() == Budget("openai:team-a", rpm=10_000, tpm=2_000_000, max_concurrency=64, burst=60)
    assert s.get_budget("openai:team-a") == s.get_budget()
    assert s.cooldown_policy() == CooldownPolicy(base=2, max_backoff=30)
    assert s.celery.max_wait == 0.5
    assert s.outage == "closed"


def test_several_budgets_as_json(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(
        "XFLOW_BUDGETS", json.dumps({"anthropic": {"tpm": 400_000, "rpm": 4_000}, "embed": {"tps": 1_000_000}})
    )
    s = Settings.load()
    assert s.get_budget("anthropic") == Budget("anthropic", tpm=400_000, rpm=4_000)
    assert [b.name for b in s.all_budgets()] == ["default", "anthropic", "embed"]
    with pytest.raises(ConfigurationError, match="no budget 'nope'"):
        s.get_budget("nope")


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [
        ("XFLOW_BUDGET__TPM", "-5", "XFLOW_BUDGET"),
        ("XFLOW_BUDGET__RPM", "many", "XFLOW_BUDGET__RPM"),
        ("XFLOW_BUDGET__SPEED", "1", "XFLOW_BUDGET__SPEED"),
        ("XFLOW_BUDGETS", '{"bad name!": {"tpm": 5}}', "XFLOW_BUDGETS"),
        ("XFLOW_COOLDOWN__BASE", "0", "XFLOW_COOLDOWN"),
        ("XFLOW_CELERY__MAX_WAIT", "-1", "XFLOW_CELERY__MAX_WAIT"),
        ("XFLOW_OUTAGE", "sometimes", "XFLOW_OUTAGE"),
    ],
)
def test_bad_values_are_configuration_errors(clean_env: pytest.MonkeyPatch, key: str, value: str, where: str) -> None:
    clean_env.setenv(key, value)
    with pytest.raises(ConfigurationError, match=where):
        Settings.load()


def test_describe_masks_passwords() -> None:
    s = Settings.load(redis_url="rediss://app:s3cret@redis.internal:6380/0")
    text = s.describe()
    assert "s3cret" not in text
    assert json.loads(text)["redis_url"] == "rediss://app:***@redis.internal:6380/0"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert mask_url("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"


def test_task_policy_from_settings(clean_env: pytest.MonkeyPatch) -> None:
    pytest.importorskip("celery")
    clean_env.setenv("XFLOW_CELERY__MAX_WAIT", "1.5")
    clean_env.setenv("XFLOW_CELERY__MAX_COUNTDOWN", "120")
    clean_env.setenv("XFLOW_COOLDOWN__JITTER", "0")
    policy = Settings.load().task_policy()
    assert policy.max_wait == 1.5 and policy.max_countdown == 120
    assert policy.cooldown == CooldownPolicy(jitter=0)


def test_cli_shows_the_settings(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from xflow_dist.cli import main

    clean_env.setenv("XFLOW_REDIS_URL", "redis://:pw@localhost:6379/0")
    clean_env.setenv("XFLOW_BUDGET__TPM", "1000")
    assert main(["settings"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["budget"]["tpm"] == 1000 and shown["redis_url"] == "redis://:***@localhost:6379/0"
    clean_env.setenv("XFLOW_BUDGET__TPM", "-1")
    assert main(["settings"]) == 2
    assert "XFLOW_BUDGET" in capsys.readouterr().err


def test_cli_shows_each_budgets_status(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str, name: str
) -> None:
    from xflow_dist.cli import main

    clean_env.setenv("XFLOW_REDIS_URL", redis_url)
    clean_env.setenv("XFLOW_BUDGET__NAME", name)
    clean_env.setenv("XFLOW_BUDGET__RPM", "60")
    assert main(["settings", "--status"]) == 0
    out = capsys.readouterr().out
    assert f"budget {name}: nothing in Redis yet" in out  # never used: no keys to show
    with Limiter(Budget(name, rpm=60), redis_url) as lim:
        lease = lim.acquire()
        assert main(["settings", "--status"]) == 0
        lease.release()
    out = capsys.readouterr().out
    assert name in out and "Status(" not in out  # the table of `xflow status`, not a dataclass repr
    assert "in flight" in out.lower()


# ------------------------------------------------------------------------------------------
# The deployment manifests.

yaml = pytest.importorskip("yaml")
sys.path.insert(0, str(ROOT))


def _known(key: str) -> bool:
    """Whether ``XFLOW_A__B`` names a field (and subfield) of the fleet's settings."""
    from workers.settings import WorkerSettings

    parts = key.removeprefix("XFLOW_").lower().split("__")
    field = WorkerSettings.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    model: Any = field.annotation
    return len(parts) == 2 and hasattr(model, "model_fields") and parts[1] in model.model_fields


def _documents() -> list[tuple[str, Any]]:
    """compose and every manifest of deploy/k8s (the base, the overlays' resources and patches)."""
    files = [ROOT / "deploy" / "docker-compose.yml", *sorted((ROOT / "deploy" / "k8s").rglob("*.yaml"))]
    return [(f.name, doc) for f in files for doc in yaml.safe_load_all(f.read_text()) if doc is not None]


def _secrets_examples() -> dict[str, str]:
    """The overlays' committed secrets.env.example files (their secretGenerator reads secrets.env)."""
    found: dict[str, str] = {}
    for example in sorted((ROOT / "deploy" / "k8s" / "overlays").glob("*/secrets.env.example")):
        for line in example.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                found[key.strip()] = value.strip()
    return found


def test_manifests_parse_and_use_only_known_variables(clean_env: pytest.MonkeyPatch) -> None:
    documents = _documents()
    kinds = {doc.get("kind") for _, doc in documents}
    assert {"ConfigMap", "Deployment", "Job", "Kustomization"} <= kinds
    seen: dict[str, str] = {}
    for _, doc in documents:
        if doc.get("kind") == "ConfigMap":
            seen.update({k: str(v) for k, v in (doc.get("data") or {}).items()})
        for container in (((doc.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []:
            seen.update({e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e})
        for service in (doc.get("services") or {}).values():
            seen.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    secrets = _secrets_examples()
    assert set(secrets) == {"XFLOW_REDIS_URL", "XFLOW_BROKER_URL", "XFLOW_API_KEY"}
    seen.update(secrets)
    assert seen, "no XFLOW_* variables found"
    unknown = sorted(k for k in seen if not _known(k))
    assert not unknown, f"variables the fleet does not read: {unknown}"
    # and the values make valid settings
    for key, value in seen.items():
        clean_env.setenv(key, value)
    from workers.settings import WorkerSettings

    s = WorkerSettings.load()
    assert s.get_budget().tpm == 120_000


def test_workers_deployment_reads_the_config_and_the_secret() -> None:
    k8s = ROOT / "deploy" / "k8s"
    deployment = next(
        d for d in yaml.safe_load_all((k8s / "base" / "workers.yaml").read_text()) if d and d["kind"] == "Deployment"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {"xflow-config", "xflow-secrets"}
    assert container["command"][:4] == ["celery", "-A", "workers.app", "worker"]
    # every manifest sits in a kustomization (as a resource or a patch), and each overlay makes the secret
    for kustomization in sorted(k8s.rglob("kustomization.yaml")):
        doc = yaml.safe_load(kustomization.read_text())
        listed = set(doc.get("resources") or []) | {p["path"] for p in doc.get("patches") or []}
        here = {p.name for p in kustomization.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert here <= listed, (kustomization, here - listed)
        if kustomization.parent.parent.name == "overlays":
            assert [g["name"] for g in doc["secretGenerator"]] == ["xflow-secrets"], kustomization
