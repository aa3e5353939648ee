from __future__ import annotations

import pytest

from xflow_dist._events import CooldownNotice, GrantNotice, HeadNotice, parse


def test_grant_notice_names_the_ticket() -> None:
    assert parse(b"g abc 100.000000") == GrantNotice("abc")


def test_head_notice_carries_the_wait_measured_by_redis() -> None:
    notice = parse(b"h abc 100.250000 100.000000", arrived=5.0)
    assert isinstance(notice, HeadNotice)
    assert notice.lease_id == "abc"
    assert notice.delay == pytest.approx(0.25)
    assert notice.arrived == 5.0


def test_cooldown_notice_carries_what_remains() -> None:
    notice = parse("c 100.000000 102.500000", arrived=7.0)
    assert notice == CooldownNotice(pytest.approx(2.5), 7.0)


def test_a_fit_time_in_the_past_means_now() -> None:
    notice = parse("h x 99.0 100.0", arrived=1.0)
    assert isinstance(notice, HeadNotice)
    assert notice.delay == 0.0


@pytest.mark.parametrize("data", [b"", b"x 1 2 3", b"g only a b", b"c a b", b"h id nan-ish 1", b"h id 1"])
def test_unknown_or_broken_messages_are_ignored(data: bytes) -> None:
    assert parse(data) is None


def test_mailroom_routes_notices_to_the_waiter_named_only() -> None:
    import queue

    from xflow_dist._events import Mailroom

    mail: Mailroom[queue.SimpleQueue[object]] = Mailroom(queue.SimpleQueue)
    inbox = mail.expect("a")
    found = mail.route(b"g a 1.0")
    assert found is not None
    assert found[0] is inbox
    assert found[1] == GrantNotice("a")
    assert mail.route(b"g b 1.0") is None  # nobody here waits for b
    assert mail.route(b"c 1.0 2.0") is None  # pauses are not for one waiter
    mail.forget("a")
    assert mail.route(b"h a 2.0 1.0") is None
