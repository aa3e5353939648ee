"""The package as users get it: its public surface and the wheel's contents."""

from __future__ import annotations

import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import xflow_dist
from xflow_dist._scripts import OPS, lua_dir, source

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPO_URL = "https://github.com/xflow-dist/xflow-dist"

# Budgets on memory:// run on the plain-Python engine: neither fakeredis nor lupa (the demo's fallback server).
MEMORY_BUDGETS = textwrap.dedent(
    """
    import asyncio
    from xflow_dist import AsyncLimiter, Budget, Limiter
    with Limiter(Budget("core", rps=10, max_concurrency=1), "memory://core") as limiter:
        limiter.acquire(tokens=1).release()
        assert limiter.status().requests_available is not None
    async def main():
        async with AsyncLimiter(Budget("core-async", tps=100), "memory://core") as limiter:
            lease = await limiter.acquire(tokens=10)
            await lease.report(actual_tokens=5)
    asyncio.run(main())
    """
)


def public_modules(paths: Sequence[str], prefix: str = "xflow_dist.") -> Iterator[str]:
    """The package's public modules, found from its files without importing them: every module and
    subpackage whose dotted path has no part starting with ``_``."""
    for info in pkgutil.iter_modules(list(paths), prefix):
        leaf = info.name.rpartition(".")[2]
        if leaf.startswith("_"):
            continue
        yield info.name
        if info.ispkg:
            yield from public_modules([os.path.join(path, leaf) for path in paths], f"{info.name}.")


def run(command: Sequence[str | Path], *, timeout: float, cwd: Path | None = None) -> str:
    """Run ``command`` bounded by ``timeout``; its stdout, or a failure that shows its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**env, "PYTHONNOUSERSITE": "1"},
        check=False,
    )
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel built from it, as ``python -m build`` makes them for PyPI: built once
    for every test of the module that looks at them."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", out, ROOT], timeout=240)
    (wheel,) = out.glob("xflow_dist-*.whl")
    (sdist,) = out.glob("xflow_dist-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_all_is_sorted_and_complete() -> None:
    assert xflow_dist.__all__ == sorted(xflow_dist.__all__)
    public = {
        name
        for name, obj in vars(xflow_dist).items()
        if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
    }
    assert public <= set(xflow_dist.__all__)
    for name in xflow_dist.__all__:
        assert hasattr(xflow_dist, name)


def test_every_exception_derives_from_xflow_error() -> None:
    for name in xflow_dist.__all__:
        obj = getattr(xflow_dist, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, xflow_dist.XflowError)


def test_every_script_documents_its_keys_argv_and_reply() -> None:
    for op in OPS:
        text = (lua_dir() / f"{op}.lua").read_text()
        assert text.startswith(f"-- {op}.lua:"), op
        assert "KEYS" in text and "Reply" in text, op
        assert "TIME" not in text.replace("Redis time", ""), f"{op} must read time through the prelude"
    prelude = (lua_dir() / "_prelude.lua").read_text()
    assert "redis.call('TIME')" in prelude
    assert source("acquire").startswith(prelude)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_ships_the_lua_scripts_and_py_typed(dists: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    assert "xflow_dist/py.typed" in names
    for op in (*OPS, "_prelude", "check_rights"):
        assert f"xflow_dist/lua/{op}.lua" in names


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = "pip install -e '.[test]' && python -m pytest"
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text()


def test_ci_runs_the_suite_on_valkey_too() -> None:
    command = "XFLOW_TEST_SERVER=valkey python -m pytest"
    assert command in (ROOT / "README.md").read_text()
    assert f"XFLOW_SERVER_TESTS_ONLY=1 {command}" in (ROOT / ".ci" / "run").read_text()


def test_the_valkey_pass_keeps_the_tests_that_talk_to_the_suite_s_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import conftest

    class Item:
        def __init__(self, *names: str, url: str | None = None) -> None:
            self.fixturenames = names
            self.callspec = SimpleNamespace(params={"url": url}) if url else None

    server = Item("name", "redis_url", "embedded")
    both = [Item("url", "redis_url", "embedded", url="redis"), Item("url", "redis_url", "embedded", url="memory")]
    own = Item("server", "real_redis", "embedded")  # a redis-server of its own, to kill
    pure = Item("tmp_path")
    dropped: list[Any] = []
    config = SimpleNamespace(hook=SimpleNamespace(pytest_deselected=lambda items: dropped.extend(items)))
    items = [server, *both, own, pure]
    conftest.pytest_collection_modifyitems(config, items)  # type: ignore[arg-type]
    assert items == [server, *both, own, pure] and dropped == []  # the first pass runs everything
    monkeypatch.setenv("XFLOW_SERVER_TESTS_ONLY", "1")
    conftest.pytest_collection_modifyitems(config, items)  # type: ignore[arg-type]
    assert items == [server, both[0]] and dropped == [both[1], own, pure]


def test_memory_budgets_need_neither_fakeredis_nor_lupa() -> None:
    """fakeredis is the demo's fallback server only: a production install (the core dependencies)
    runs ``memory://`` on the plain-Python engine, sync and asyncio fronts alike."""
    code = (
        'import sys\nsys.modules["fakeredis"] = None  # import fakeredis now fails, as where it is not installed\n'
        'sys.modules["lupa"] = None\n' + MEMORY_BUDGETS + 'print("ok")\n'
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sdist_carries_what_its_tests_need(dists: dict[str, Path]) -> None:
    """The suite's fleet tests start ``workers/`` and read ``deploy/``: an sdist without them cannot
    run its own tests."""
    with tarfile.open(dists["sdist"]) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    manifests = [path.relative_to(ROOT).as_posix() for path in (ROOT / "deploy" / "k8s").rglob("*.yaml")]
    assert manifests
    for needed in ("workers/app.py", "deploy/Dockerfile", *manifests, "tests/conftest.py",
                   "lua/acquire.lua", "LICENSE", "CHANGELOG.md"):  # fmt: skip
        assert needed in names, needed


@pytest.mark.slow
def test_the_sdists_own_tests_run(dists: dict[str, Path], tmp_path: Path) -> None:
    """Unpacked, the sdist runs its tests (a few modules of them: the budget, the scripts against the
    suite's own redis-server, the exact engine), importing the library from the unpacked tree."""
    with tarfile.open(dists["sdist"]) as archive:
        archive.extractall(tmp_path, filter="data")
    (tree,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    env = {**os.environ, "PYTHONPATH": str(tree), "XFLOW_REQUIRE_REDIS": os.environ.get("XFLOW_REQUIRE_REDIS", "")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_budget.py",
         "tests/test_scripts.py", "tests/test_script_args.py"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and str(tree) in subprocess.run(
        [sys.executable, "-c", "import xflow_dist; print(xflow_dist.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip


def test_the_version_has_one_source() -> None:
    """``__version__`` in ``xflow_dist/__init__.py``: the build reads it (hatch's dynamic version), so
    wheels, sdists and editable installs carry the same one."""
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["hatch"]["version"] == {"path": "xflow_dist/__init__.py"}
    lines = re.findall(r"(?m)^__version__ *= *\"([^\"]+)\"", (ROOT / "xflow_dist" / "__init__.py").read_text())
    assert lines == [xflow_dist.__version__]


def test_xflow_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from xflow_dist.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"xflow-dist {xflow_dist.__version__}"


def test_project_metadata() -> None:
    project = PYPROJECT["project"]
    classifiers = project["classifiers"]
    assert classifiers == sorted(classifiers) and len(set(classifiers)) == len(classifiers)
    # an SPDX `license` replaces the License classifiers (PEP 639): PyPI refuses both together
    assert isinstance(project["license"], str)
    assert not [c for c in classifiers if c.startswith("License ::")]
    lowest = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert lowest, project["requires-python"]
    minors = [int(m) for c in classifiers for m in re.findall(r"^Programming Language :: Python :: 3\.(\d+)$", c)]
    assert min(minors) == int(lowest.group(1)), "the Python classifiers start at requires-python"
    assert {"Typing :: Typed", "Framework :: AsyncIO", "Framework :: Celery"} <= set(classifiers)
    urls = project["urls"]
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= set(urls)
    assert all(url == REPO_URL or url.startswith(f"{REPO_URL}/") for url in urls.values())


def test_the_celery_extra_brings_the_default_transport() -> None:
    """``self.transport()`` in a task imports ``xflow_dist.<http>``: the celery extra must install the
    HTTP library of its default."""
    from xflow_dist.celery import RateLimitedTask

    default = inspect.signature(RateLimitedTask.transport).parameters["http"].default
    extra = PYPROJECT["project"]["optional-dependencies"]["celery"]
    names = {re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower() for requirement in extra}
    assert default in names
    assert {"celery", "pydantic-settings"} <= names


# Run inside a fresh venv that has the package and its core dependencies only: imports every public
# module found in the installed files, and reports what it found as JSON.
CORE_ONLY_CHECK = r"""
from __future__ import annotations
import importlib, importlib.metadata, importlib.util, json, os, pkgutil, re, subprocess, sys
from collections.abc import Iterator, Sequence
from pathlib import Path

assert importlib.util.find_spec("fakeredis") is None and importlib.util.find_spec("lupa") is None, "not core-only"
PUBLIC_MODULES
spec = importlib.util.find_spec("xflow_dist")  # finds the installed files without importing them
found = list(public_modules(spec.submodule_search_locations))
imported, needs_extra = [], {}
for name in found:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        extra = re.search(r"pip install 'xflow-dist\[([\w-]+)\]'", str(exc))
        cause = exc.__cause__ or exc
        needs_extra[name] = {
            "message": str(exc), "extra": extra and extra.group(1), "missing": getattr(cause, "name", None)
        }
    else:
        imported.append(name)

import xflow_dist
from xflow_dist._scripts import OPS, lua_dir
assert all((lua_dir() / f"{op}.lua").is_file() for op in OPS), lua_dir()
MEMORY_BUDGETS
dist = importlib.metadata.distribution("xflow-dist")
xflow = Path(sys.executable).parent / "xflow"  # the console script
cli = subprocess.run([xflow, "--version"], capture_output=True, text=True, timeout=60, check=True)
print(json.dumps({
    "file": xflow_dist.__file__,
    "prefix": sys.prefix,
    "version": xflow_dist.__version__,
    "metadata_version": dist.version,
    "cli": cli.stdout.strip(),
    "extras": dist.metadata.get_all("Provides-Extra") or [],
    "found": found,
    "imported": imported,
    "needs_extra": needs_extra,
}))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_a_core_only_install_imports_every_public_module(kind: str, dists: dict[str, Path], tmp_path: Path) -> None:
    """Each artifact installed with its core dependencies only (no extra) in a venv of its own: every
    public module imports, or says which extra it needs; memory:// budgets work; ``xflow --version``
    prints the version the metadata carries."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=120)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", dists[kind]], timeout=180, cwd=tmp_path)
    script = tmp_path / "check.py"  # in tmp_path, away from the checkout's xflow_dist/
    script.write_text(
        CORE_ONLY_CHECK.replace("PUBLIC_MODULES", inspect.getsource(public_modules)).replace(
            "MEMORY_BUDGETS", MEMORY_BUDGETS
        )
    )
    report = json.loads(run([python, script], timeout=120, cwd=tmp_path))

    assert Path(report["file"]).is_relative_to(report["prefix"]), report["file"]  # the installed copy
    assert report["version"] == report["metadata_version"] == xflow_dist.__version__
    assert report["cli"] == f"xflow-dist {xflow_dist.__version__}"
    # the installed package has every public module of the checkout, found from its files
    assert set(report["found"]) == set(public_modules([str(ROOT / "xflow_dist")]))
    assert {"xflow_dist.cli", "xflow_dist.compat", "xflow_dist.tools"} <= set(report["imported"])
    for name, failure in report["needs_extra"].items():
        # a missing optional dependency, named with the extra that brings it: not a broken import of ours
        assert failure["extra"] in report["extras"], (name, failure)
        assert name in failure["message"], (name, failure)
        assert failure["missing"] and not failure["missing"].startswith("xflow_dist"), (name, failure)
