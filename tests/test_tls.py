"""TLS: ``rediss://`` URLs with a CA and a client certificate, against a real ``redis-server`` that
listens only on a TLS port and requires client certificates (certificates made at test time)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis
import redis.asyncio
from _certs import Certificates, make_certificates
from _helpers import budget_keys, exercise, exercise_async
from _servers import RedisServer

from xflow_dist import AsyncLimiter, BackendError, Budget, Limiter
from xflow_dist._backend import async_client, sync_client
from xflow_dist.tools._embedded import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_port(certs: Certificates) -> Iterator[int]:
    """A redis-server with no plain port: TLS only, client certificates required."""

    def ping(port: int) -> redis.Redis:
        return redis.Redis.from_url(url(port, certs))

    server = RedisServer(
        "--port", "0",
        "--tls-cert-file", str(certs.server_cert),
        "--tls-key-file", str(certs.server_key),
        "--tls-ca-cert-file", str(certs.ca),
        "--tls-auth-clients", "yes",
        port_option="--tls-port",
        ping=ping,
    )  # fmt: skip
    try:
        server.start()
    except RuntimeError as exc:
        if "TLS" in str(exc) and os.environ.get("XFLOW_REQUIRE_REDIS", "") in ("", "0"):
            pytest.skip(f"this redis-server was built without TLS: {exc}")
        raise
    yield server.port
    server.stop()


def url(port: int, certs: Certificates, *, client_cert: bool = True, ca: Path | None = None) -> str:
    """The URL of the TLS server: this CA (or ``ca``), this client certificate unless ``client_cert`` is False."""
    query = {"ssl_ca_certs": str(ca or certs.ca), "ssl_cert_reqs": "required"}
    if client_cert:
        query |= {"ssl_certfile": str(certs.client_cert), "ssl_keyfile": str(certs.client_key)}
    return f"rediss://127.0.0.1:{port}/0?{urlencode(query)}"


def test_rediss_url_makes_a_blocking_pool_of_tls_connections(certs: Certificates) -> None:
    client, owned = sync_client(url(6390, certs), io_timeout=0.7)
    pool = client.connection_pool
    assert owned and isinstance(pool, redis.BlockingConnectionPool)
    assert pool.connection_class is redis.SSLConnection
    kwargs = pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(certs.ca) and kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_certfile"] == str(certs.client_cert) and kwargs["ssl_keyfile"] == str(certs.client_key)
    assert kwargs["socket_timeout"] == 0.7 and kwargs["socket_connect_timeout"] == 0.7  # ours, kept
    client.close()


async def test_rediss_url_makes_an_async_blocking_pool_of_tls_connections(certs: Certificates) -> None:
    client, owned = async_client(url(6390, certs), io_timeout=0.7)
    pool = client.connection_pool
    assert owned and isinstance(pool, redis.asyncio.BlockingConnectionPool)
    assert pool.connection_class is redis.asyncio.SSLConnection
    kwargs = pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(certs.ca) and kwargs["ssl_certfile"] == str(certs.client_cert)
    assert kwargs["socket_timeout"] == 0.7
    await client.aclose()


def test_whole_flow_over_tls(tls_port: int, certs: Certificates, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=1), url(tls_port, certs)) as limiter:
        exercise(limiter)
    check = redis.Redis.from_url(url(tls_port, certs))
    assert budget_keys(check, name)  # the state really is on the TLS server
    check.close()


async def test_whole_flow_over_tls_async(tls_port: int, certs: Certificates, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=1), url(tls_port, certs)) as limiter:
        await exercise_async(limiter)


def _refused(exc: BaseException) -> None:
    assert isinstance(exc, BackendError)
    # the server's alert ("certificate required") is read or not, depending on timing: the hint is always there
    assert "ssl_certfile" in str(exc) and "ssl_keyfile" in str(exc), exc


@pytest.mark.parametrize("call", ["acquire", "try_acquire", "status"])
def test_client_without_certificate_is_refused(tls_port: int, certs: Certificates, name: str, call: str) -> None:
    with Limiter(Budget(name, max_concurrency=1), url(tls_port, certs, client_cert=False), io_timeout=0.5) as lim:
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            getattr(lim, call)()
        assert time.monotonic() - started < 2.0  # two tries at most, each bounded by io_timeout
        _refused(caught.value)


@pytest.mark.parametrize("call", ["acquire", "try_acquire", "status"])
async def test_client_without_certificate_is_refused_async(
    tls_port: int, certs: Certificates, name: str, call: str
) -> None:
    budget = Budget(name, max_concurrency=1)
    async with AsyncLimiter(budget, url(tls_port, certs, client_cert=False), io_timeout=0.5) as lim:
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            await getattr(lim, call)()
        assert time.monotonic() - started < 2.0
        _refused(caught.value)


def test_no_server_at_all_is_no_certificate_matter(certs: Certificates, name: str) -> None:
    with Limiter(Budget(name), url(free_port(), certs), io_timeout=0.5) as lim, pytest.raises(BackendError) as caught:
        lim.status()
    assert "refused" in str(caught.value) and "ssl_certfile" not in str(caught.value)


def test_a_server_the_ca_did_not_sign_is_refused(tls_port: int, certs: Certificates, name: str, tmp_path: Path) -> None:
    other = make_certificates(tmp_path)  # another CA: the client must not trust the server
    with Limiter(Budget(name), url(tls_port, certs, ca=other.ca)) as lim, pytest.raises(BackendError) as caught:
        lim.status()
    assert "certificate verify failed" in str(caught.value)
