from __future__ import annotations

import pytest

from xflow_dist._events import CooldownNotice, GrantNotice, PauseClock, parse


def test_grant_notice_carries_the_delay_measured_by_redis() -> None:
    notice = parse(b"g abc 100.250000 100.000000", arrived=5.0)
    assert notice == GrantNotice("abc", pytest.approx(0.25), 5.0)


def test_cooldown_notice_carries_remaining_and_shift() -> None:
    notice = parse("c 100.000000 102.500000 2.000000", arrived=7.0)
    assert isinstance(notice, CooldownNotice)
    assert notice.remaining == pytest.approx(2.5)
    assert notice.shift == pytest.approx(2.0)
    assert notice.key == "100.000000 102.500000"


@pytest.mark.parametrize("data", [b"", b"x 1 2 3", b"g only", b"c a b c", b"g id nan-ish 1"])
def test_unknown_or_broken_messages_are_ignored(data: bytes) -> None:
    assert parse(data) is None


def test_reservation_made_before_a_pause_moves_back_by_its_shift() -> None:
    clock = PauseClock()
    clock.record(CooldownNotice(remaining=2.0, shift=2.0, arrived=10.0, key="k"))
    # reserved at 9 to start at 11: the pause began at 10 and lasts until 12; it moves to 13
    assert clock.adjust(11.0, since=9.0) == pytest.approx(13.0)
    # due before the pause began but not yet started: waits for the end of the pause
    assert clock.adjust(9.5, since=9.0) == pytest.approx(12.0)
    # reserved after the pause was announced: the script already accounted for it
    assert clock.adjust(12.5, since=10.5) == pytest.approx(12.5)


def test_the_same_pause_is_recorded_once() -> None:
    clock = PauseClock()
    notice = CooldownNotice(remaining=1.0, shift=1.0, arrived=0.0, key="same")
    clock.record(notice)
    clock.record(CooldownNotice(remaining=1.0, shift=1.0, arrived=0.001, key="same"))
    assert clock.adjust(0.5, since=-1.0) == pytest.approx(1.5)


def test_pause_left() -> None:
    clock = PauseClock()
    assert clock.pause_left(now=0.0) == 0.0
    clock.record(CooldownNotice(remaining=3.0, shift=0.0, arrived=1.0, key="a"))
    assert clock.pause_left(now=2.0) == pytest.approx(2.0)
    assert clock.pause_left(now=5.0) == 0.0
