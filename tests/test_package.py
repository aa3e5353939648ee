"""The package as users get it: its public surface and the wheel's contents."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import xflow_dist
from xflow_dist._scripts import OPS, lua_dir, source

ROOT = Path(__file__).resolve().parent.parent


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
def test_wheel_ships_the_lua_scripts_and_py_typed(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("xflow_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
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
    assert command in (ROOT / ".ci" / "run").read_text()


def test_memory_budgets_need_neither_fakeredis_nor_lupa() -> None:
    """fakeredis is the demo's fallback server only: a production install (the core dependencies)
    runs ``memory://`` on the plain-Python engine, sync and asyncio fronts alike."""
    code = textwrap.dedent(
        """
        import asyncio, sys
        sys.modules["fakeredis"] = None  # import fakeredis now fails, as where it is not installed
        sys.modules["lupa"] = None
        from xflow_dist import AsyncLimiter, Budget, Limiter
        with Limiter(Budget("core", rps=10, max_concurrency=1), "memory://core") as limiter:
            limiter.acquire(tokens=1).release()
            assert limiter.status().requests_available is not None
        async def main():
            async with AsyncLimiter(Budget("core-async", tps=100), "memory://core") as limiter:
                lease = await limiter.acquire(tokens=10)
                await lease.report(actual_tokens=5)
        asyncio.run(main())
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sdist_carries_what_its_tests_need(tmp_path: Path) -> None:
    """The suite's fleet tests start ``workers/`` and read ``deploy/``: an sdist without them cannot
    run its own tests."""
    import tarfile

    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (sdist,) = tmp_path.glob("xflow_dist-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    for needed in ("workers/app.py", "deploy/Dockerfile", "deploy/k8s/workers.yaml", "tests/conftest.py",
                   "lua/acquire.lua", "LICENSE", "CHANGELOG.md"):  # fmt: skip
        assert needed in names, needed
