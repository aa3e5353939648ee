"""ACL: the documented rule is enough for the whole flow and grants nothing more; a user missing a
right gets PermissionDeniedError at the first call, with nothing written (``xflow_dist._acl``).

A redis-server of this module's own: its ACL users, log and command counts are the tests' alone.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from _helpers import budget_keys, exercise, exercise_async
from _servers import RedisServer

from xflow_dist import AsyncLimiter, Budget, Limiter, PermissionDeniedError
from xflow_dist._acl import ACL_RULE, CLIENT_COMMANDS, SCRIPT_COMMANDS, decode
from xflow_dist._acl import source as check_source
from xflow_dist._scripts import OPS, source

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    client.acl_log_reset()
    yield client
    client.close()


def rule(admin: redis.Redis) -> list[str]:
    """The documented rule, with the handshake's subcommands this server accepts (docs/security.md)."""
    words = ACL_RULE.split()
    for handshake in ("+client|setinfo", "+client|maint_notifications"):
        try:
            admin.execute_command("ACL", "SETUSER", "probe", handshake)
        except redis.ResponseError:  # a subcommand this server does not know: refused, and not needed
            continue
        finally:
            admin.execute_command("ACL", "DELUSER", "probe")
        words.append(handshake)
    return words


@pytest.fixture(scope="module")
def checked(server: RedisServer) -> None:
    """Skips where the server cannot check rights (before Redis 7.0: no ``redis.acl_check_cmd``)."""
    client = redis.Redis(host="127.0.0.1", port=server.port)
    if not client.eval("return redis.acl_check_cmd ~= nil and 1 or 0", 0):
        pytest.skip("this server has no redis.acl_check_cmd (before Redis 7.0): rights are not checked")
    client.close()


@pytest.fixture
def make_user(admin: redis.Redis, server: RedisServer) -> Iterator[Callable[[list[str]], str]]:
    """Creates a user with these ACL words (and a password) and returns a URL that logs in as it."""
    made: list[str] = []

    def make(words: list[str]) -> str:
        user = f"u{uuid.uuid4().hex[:10]}"
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", *words)  # as an operator types it
        made.append(user)
        return f"redis://{user}:pw@127.0.0.1:{server.port}/0"

    yield make
    for user in made:
        admin.acl_deluser(user)


def _refusals(admin: redis.Redis) -> list[dict[str, object]]:
    return [entry for entry in admin.acl_log() if str(entry.get("username", "")).startswith("u")]


# --- the rule itself ---------------------------------------------------------------------------


def test_rule_grants_only_the_budget_keys_and_channels_and_the_listed_commands() -> None:
    words = ACL_RULE.split()
    assert "~*" not in words and "allkeys" not in words and "&*" not in words and "allchannels" not in words
    assert "+@all" not in words and "allcommands" not in words and "-@all" in words
    assert [w for w in words if w[0] in "~&%"] == ["~{xflow:*", "&{xflow:*"]
    granted = {w[1:].upper() for w in words if w.startswith("+")}
    assert not any(w.startswith("+@") for w in words)  # no categories: each command by name
    assert granted == {c.replace(" ", "|") for c in (*CLIENT_COMMANDS, *SCRIPT_COMMANDS)}


def test_rule_covers_every_command_the_scripts_run() -> None:
    called: set[str] = set()
    for op in OPS:
        text = source(op)
        calls = re.findall(r"redis\.p?call\(([^,)]*)(?:, '([A-Z]+)')?", text)
        assert all(re.fullmatch(r"'[A-Z]+'", first) for first, _ in calls), (op, calls)  # never a command in a variable
        called |= {first.strip("'") + (f"|{sub}" if first == "'PUBSUB'" else "") for first, sub in calls}
    assert called == SCRIPT_COMMANDS


def test_key_and_channel_patterns_match_the_names_the_library_uses(name: str) -> None:
    from xflow_dist._core import channel, keys

    budget = Budget(name)
    # Redis globs treat braces literally: "~{xflow:*}" would match no key, since a key ends in ":state" etc.
    assert all(k.startswith("{xflow:") for k in keys(budget)) and channel(budget).startswith("{xflow:")


def test_docs_show_the_rule() -> None:
    security = (ROOT / "docs" / "security.md").read_text()
    assert ACL_RULE in " ".join(security.split())
    assert "docs/security.md" in (ROOT / "README.md").read_text()


# --- the whole flow as the documented user -----------------------------------------------------


def test_whole_flow_as_the_documented_user(admin: redis.Redis, make_user: Callable[[list[str]], str]) -> None:
    url = make_user(rule(admin))
    name = f"acl-{uuid.uuid4().hex[:8]}"
    admin.script_flush()  # so that SCRIPT LOAD is exercised too
    with Limiter(Budget(name, max_concurrency=1), url) as limiter:
        exercise(limiter)
        assert limiter._rights.done
    assert budget_keys(admin, name)
    assert _refusals(admin) == []  # not one command refused, the handshake's included


async def test_whole_flow_as_the_documented_user_async(
    admin: redis.Redis, make_user: Callable[[list[str]], str]
) -> None:
    url = make_user(rule(admin))
    admin.script_flush()
    async with AsyncLimiter(Budget(f"acl-{uuid.uuid4().hex[:8]}", max_concurrency=1), url) as limiter:
        await exercise_async(limiter)
        assert limiter._rights.done
    assert _refusals(admin) == []


# --- a right missing ---------------------------------------------------------------------------

MISSING = {
    "+publish": "PUBLISH",
    "+pexpireat": "PEXPIREAT",
    "&{xflow:*": "PUBLISH",  # the channel: PUBLISH and SUBSCRIBE on it
    "+subscribe": "SUBSCRIBE",
    "+hset": "HSET",
    "+time": "TIME",
    "+ping": "PING",
    "+pubsub|numsub": "PUBSUB NUMSUB",
}


@pytest.mark.parametrize("dropped", sorted(MISSING))
def test_a_missing_right_is_refused_at_the_first_call_with_nothing_written(
    checked: None, admin: redis.Redis, make_user: Callable[[list[str]], str], dropped: str
) -> None:
    url = make_user([w for w in rule(admin) if w != dropped])
    name = f"acl-{uuid.uuid4().hex[:8]}"
    with Limiter(Budget(name, rps=10, max_concurrency=1), url) as limiter:
        for call in (limiter.acquire, limiter.try_acquire, limiter.status, limiter.cooldown):
            with pytest.raises(PermissionDeniedError) as caught:
                call()
            assert MISSING[dropped] in caught.value.missing
            assert caught.value.budget == name
            assert "docs/security.md" in str(caught.value) and ACL_RULE in str(caught.value)
        assert not limiter._rights.done
    assert budget_keys(admin, name) == []
    assert _refusals(admin) == []  # no script ran to be refused halfway


@pytest.mark.parametrize("dropped", ["+publish", "&{xflow:*", "+pexpireat"])
async def test_a_missing_right_is_refused_at_the_first_call_async(
    checked: None, admin: redis.Redis, make_user: Callable[[list[str]], str], dropped: str
) -> None:
    url = make_user([w for w in rule(admin) if w != dropped])
    name = f"acl-{uuid.uuid4().hex[:8]}"
    async with AsyncLimiter(Budget(name, rps=10, max_concurrency=1), url) as limiter:
        with pytest.raises(PermissionDeniedError) as caught:
            await limiter.acquire()
        assert MISSING[dropped] in caught.value.missing
        with pytest.raises(PermissionDeniedError):
            await limiter.try_acquire()
    assert budget_keys(admin, name) == []
    assert _refusals(admin) == []


def test_a_budget_in_use_is_left_exactly_as_it_was(
    checked: None, admin: redis.Redis, make_user: Callable[[list[str]], str]
) -> None:
    name = f"acl-{uuid.uuid4().hex[:8]}"
    budget = Budget(name, rps=10, max_concurrency=2)
    with Limiter(budget, make_user(rule(admin))) as full:
        held = full.acquire(tokens=5)
        before = {k: admin.dump(k) for k in budget_keys(admin, name)}
        with Limiter(budget, make_user([w for w in rule(admin) if w != "+publish"])) as limited:
            with pytest.raises(PermissionDeniedError):
                limited.acquire()
            with pytest.raises(PermissionDeniedError):
                limited.cooldown(retry_after=5)
        assert {k: admin.dump(k) for k in budget_keys(admin, name)} == before
        held.release()


@pytest.mark.parametrize("dropped", ["+evalsha", "+script|load", "~{xflow:*"])
@pytest.mark.parametrize("cached", [False, True])
def test_no_right_to_run_the_scripts(
    checked: None, admin: redis.Redis, make_user: Callable[[list[str]], str], dropped: str, cached: bool
) -> None:
    """EVALSHA refused (the command, or the budget's keys), or SCRIPT LOAD: whether the check script
    is in the server's cache (then the check itself finds SCRIPT LOAD missing) or not."""
    url = make_user([w for w in rule(admin) if w != dropped])
    name = f"acl-{uuid.uuid4().hex[:8]}"
    admin.script_flush()
    if cached:
        admin.script_load(check_source())
    with Limiter(Budget(name, max_concurrency=1), url) as limiter, pytest.raises(PermissionDeniedError) as caught:
        limiter.acquire()
    expected = {"+evalsha": "EVALSHA", "+script|load": "SCRIPT LOAD", "~{xflow:*": "EVALSHA"}[dropped]
    assert caught.value.missing == (expected,)
    assert budget_keys(admin, name) == []


def test_a_right_granted_later_is_taken_at_once(
    checked: None, admin: redis.Redis, make_user: Callable[[list[str]], str]
) -> None:
    url = make_user([w for w in rule(admin) if w != "+publish"])
    user = url.split("//")[1].split(":")[0]
    with Limiter(Budget(f"acl-{uuid.uuid4().hex[:8]}", max_concurrency=1), url) as limiter:
        with pytest.raises(PermissionDeniedError):
            limiter.try_acquire()
        admin.execute_command("ACL", "SETUSER", user, "+publish")
        decision = limiter.try_acquire()
        assert decision.granted and decision.lease is not None
        decision.lease.release()


def _evalsha_calls(admin: redis.Redis) -> int:
    """EVALSHA calls that ran a script (not those answered NOSCRIPT, which the script then loads)."""
    stats = admin.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats["calls"]) - int(stats["failed_calls"]) if stats else 0


def test_rights_are_checked_once_per_limiter_across_threads(
    admin: redis.Redis, make_user: Callable[[list[str]], str]
) -> None:
    url = make_user(rule(admin))
    with Limiter(Budget(f"acl-{uuid.uuid4().hex[:8]}", max_concurrency=100), url) as limiter:
        admin.config_resetstat()
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def first_call() -> None:
            try:
                start.wait(timeout=10)
                limiter.status()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=first_call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert not errors
        assert _evalsha_calls(admin) == 8 + 1  # eight status calls, one check
        for _ in range(5):
            limiter.status()
        assert _evalsha_calls(admin) == 13 + 1


async def test_rights_are_checked_once_per_limiter_across_tasks(
    admin: redis.Redis, make_user: Callable[[list[str]], str]
) -> None:
    url = make_user(rule(admin))
    async with AsyncLimiter(Budget(f"acl-{uuid.uuid4().hex[:8]}", max_concurrency=100), url) as limiter:
        admin.config_resetstat()
        await asyncio.gather(*(limiter.status() for _ in range(8)))
        assert _evalsha_calls(admin) == 8 + 1


def test_a_server_without_acl_check_cmd_is_not_checked() -> None:
    # Redis 6 has no redis.acl_check_cmd: the check script says so and the limiter goes on
    assert decode("b", [], [b"unchecked"]) is False
    assert decode("b", [("PING",)], [b"checked"]) is True
    with pytest.raises(PermissionDeniedError):
        decode("b", [("PING",)], [b"checked", b"1"])
