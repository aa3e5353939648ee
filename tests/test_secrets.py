"""No password or API key appears in any output, error, log line or repr."""

from __future__ import annotations

import logging
import traceback

import pytest

from xflow_dist import AsyncLimiter, Budget, Limiter, XflowError
from xflow_dist._redact import redact_text, redact_url
from xflow_dist.cli import main
from xflow_dist.settings import Settings

SECRET = "S3cr3t-pa55word"
KEY = "sk-live-abcdef0123456789"


def _with_password(url: str, user: str = "") -> str:
    return url.replace("redis://", f"redis://{user}:{SECRET}@", 1)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://user:{SECRET}@host:6379/0", "redis://user:***@host:6379/0"),
        (f"redis://:{SECRET}@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        (f"rediss://default:{SECRET}@host/1?ssl_cert_reqs=none", "rediss://default:***@host/1?ssl_cert_reqs=none"),
        (f"unix:///tmp/r.sock?db=0&password={SECRET}", "unix:///tmp/r.sock?db=0&password=***"),
        (f"redis://:p@ss/{SECRET}@host/0", "redis://:***@host/0"),  # an unencoded "@" and "/" in it
        (f"redis://u:{SECRET}@host:port/0", "redis://u:***@host:port/0"),  # malformed: still masked
        ("redis://host:6379/0?client_name=a@b", "redis://host:6379/0?client_name=a@b"),
        ("memory://x", "memory://x"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_masks_every_url_in_it() -> None:
    text = f"a redis://u:{SECRET}@h:1/0 and 'rediss://:{SECRET}@k/2'"
    assert redact_text(text) == "a redis://u:***@h:1/0 and 'rediss://:***@k/2'"


def _clean(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and KEY not in text, text


def _everything(exc: BaseException) -> str:
    """What an error shows anywhere: message, repr, and the whole printed chain."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def test_settings_output_hides_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    monkeypatch.setenv("XFLOW_REDIS_URL", _with_password(redis_url))
    assert main(["settings"]) == 0
    out = capsys.readouterr()
    _clean(out.out, out.err)
    assert ":***@127.0.0.1" in out.out


def test_settings_status_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    redis_url: str,
) -> None:
    # redis-py sends a password-only AUTH that a server without one ignores: the status is read
    monkeypatch.setenv("XFLOW_REDIS_URL", _with_password(redis_url))
    with caplog.at_level(logging.DEBUG):
        assert main(["settings", "--status"]) == 0
        # a user the server does not know: an error path
        monkeypatch.setenv("XFLOW_REDIS_URL", _with_password(redis_url, user="bob"))
        assert main(["settings", "--status"]) == 1
        # nothing listening
        monkeypatch.setenv("XFLOW_REDIS_URL", f"redis://bob:{SECRET}@127.0.0.1:1/0")
        assert main(["settings", "--status"]) == 1
        # a bad URL
        monkeypatch.setenv("XFLOW_REDIS_URL", f"redis://bob:{SECRET}@127.0.0.1:port/0")
        assert main(["settings", "--status"]) == 1
    out = capsys.readouterr()
    _clean(out.out, out.err, caplog.text)
    assert ("nothing in Redis yet" in out.out or "in flight" in out.out) and "xflow settings:" in out.err


def test_demo_hides_the_password_of_the_redis_it_cannot_reach(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rich")
    code = main(["demo", "--redis-url", f"redis://user:{SECRET}@127.0.0.1:1/0", "--no-live", "-n", "1"])
    out = capsys.readouterr()
    assert code == 1
    _clean(out.out, out.err)
    assert "user:***@127.0.0.1:1" in out.out


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{SECRET}@127.0.0.1:1/0",  # not a Redis scheme
        f"redis://user:{SECRET}@127.0.0.1:port/0",  # a port redis-py cannot read
        f"redis://:p@ss/{SECRET}@127.0.0.1:1/0",  # an unencoded "@" and "/" in the password
        f"redis://user:{SECRET}@[::1/0",  # does not parse
        f"redis://user:{SECRET}@127.0.0.1:1/0",  # nothing listening
    ],
)
def test_errors_and_logs_hide_the_password(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(XflowError) as caught,
        Limiter(Budget("secrets"), url, outage="closed") as lim,
    ):
        lim.acquire(timeout=1)
    _clean(_everything(caught.value), caplog.text)


def test_the_outage_log_hides_the_password(caplog: pytest.LogCaptureFixture) -> None:
    """The default policy runs on a local share: what it logs of the failure names no password."""
    with caplog.at_level(logging.DEBUG), Limiter(Budget("secrets"), f"redis://user:{SECRET}@127.0.0.1:1/0") as lim:
        lim.acquire(timeout=1).release()
        assert lim.status().mode == "local"
    assert "outage policy 'local'" in caplog.text
    _clean(caplog.text)


async def test_async_errors_hide_the_password(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    for url in (f"redis://user:{SECRET}@127.0.0.1:port/0", _with_password(redis_url, user="bob")):
        with caplog.at_level(logging.DEBUG), pytest.raises(XflowError) as caught:
            async with AsyncLimiter(Budget("secrets"), url) as lim:
                await lim.status()
        _clean(_everything(caught.value), caplog.text)


def test_a_limiter_and_its_client_do_not_show_the_password(redis_url: str) -> None:
    with Limiter(Budget("secrets"), _with_password(redis_url)) as lim:
        _clean(repr(lim), str(lim), repr(lim._client), repr(lim._client.connection_pool))


def test_settings_reprs_hide_the_password() -> None:
    s = Settings(redis_url=f"redis://user:{SECRET}@host:6379/0")
    _clean(repr(s), str(s), s.describe())
    assert "user:***@host:6379" in repr(s)


def test_worker_settings_hide_urls_and_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.settings import WorkerSettings

    monkeypatch.setenv("XFLOW_API_KEY", KEY)
    monkeypatch.setenv("XFLOW_BROKER_URL", f"redis://:{SECRET}@broker:6379/1")
    monkeypatch.setenv("XFLOW_RESULT_BACKEND", f"redis://:{SECRET}@backend:6379/2")
    s = WorkerSettings.load()
    assert s.api_key is not None and s.api_key.get_secret_value() == KEY
    _clean(repr(s), str(s), s.describe())
