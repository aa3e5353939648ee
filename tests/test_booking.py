"""Booking: a queued call of a budget with no classes, tenants or caps is reserved for its fit time.

Any script that finds it at the head, its process connected, within two refill times of its cost of
that time, grants it firm for a later start (``g <id> <now> f <start>``): its waiter starts then
without coming back, so where a rate binds a request costs an acquire and a settle, as where slots
bind (``advance()`` in ``lua/_prelude.lua``). Its own arrival never books it: a lone waiter still
follows a limit learned while it sleeps, and a cancel before its fit time refunds it all
(``tests/test_learning.py``, ``tests/test_async_limiter.py``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import redis
from _helpers import counting_scripts, results_of_processes

from xflow_dist import AcquireTimeout, Budget, Limiter
from xflow_dist._core import ANYWHERE, keys
from xflow_dist._events import CooldownNotice, GrantNotice, Resubscribed, parse
from xflow_dist._flow import AwaitNotice, GiveBack, RunScript, acquire_flow


def test_a_waiter_at_the_head_is_booked_by_another_script_and_starts_at_its_fit_time(url: str, name: str) -> None:
    budget = Budget(name, rps=2, burst=0.0)  # one call every 0.5 s: the horizon is 1 s
    with Limiter(budget, url) as holder, Limiter(budget, url) as other:
        first = holder.acquire()
        counts = counting_scripts(other)
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append((other.acquire(timeout=10), time.monotonic())))
        started = time.monotonic()
        waiter.start()
        deadline = time.monotonic() + 5
        while holder.status().queued == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder.status().queued == 1, "the waiter did not queue"
        assert not holder.try_acquire(), "a call passed the queue"  # this script books the head
        waiter.join(timeout=10)
        assert got, "the waiter was not served"
        lease, at = got[0]
        assert counts["acquire"] == 1, f"the booked waiter came back for its grant: {dict(counts)}"
        assert at - started >= 0.4, "the booked waiter started before its fit time"
        if url.startswith("redis"):
            client = redis.Redis.from_url(url)
            held = client.hmget(keys(budget)[2], [first.id, lease.id])
            client.close()
            assert held[0] is not None and held[1] is not None
            start0, start1 = float(held[0].split()[2]), float(held[1].split()[2])
            assert start1 == pytest.approx(start0 + 0.5, abs=1e-5), "booked for another time than its fit"
            assert not held[1].endswith(b" p"), "a booking is firm"
        lease.release()
        first.release()
        assert holder.status().in_flight == 0


def test_a_waiter_of_a_budget_with_classes_is_not_booked(url: str, name: str) -> None:
    budget = Budget(name, rps=2, burst=0.0, priorities={"high": 1, "low": 0})
    with Limiter(budget, url) as holder, Limiter(budget, url) as other:
        first = holder.acquire(priority="low")
        counts = counting_scripts(other)
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(other.acquire(timeout=10, priority="low")))
        waiter.start()
        deadline = time.monotonic() + 5
        while holder.status().queued == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not holder.try_acquire(priority="low")
        waiter.join(timeout=10)
        assert got and counts["acquire"] == 2, f"not one return at the fit time: {dict(counts)}"
        got[0].release()
        first.release()


def _paced(url: str, name: str, calls: int, threads: int, out: Any) -> None:
    with Limiter(Budget(name, rps=20, burst=0.0), url) as lim:
        lim.acquire().release()  # subscribed: this process is connected from here on
        counts = counting_scripts(lim)
        counts.clear()

        def work() -> None:
            for _ in range(calls):
                lim.acquire(timeout=30).release()

        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=60)
        out.put((os.getpid(), dict(counts)))


@pytest.mark.timeout(120)
def test_processes_paced_by_a_rate_spend_about_an_acquire_and_a_settle_per_request(redis_url: str, name: str) -> None:
    """Two processes of three threads each, every call released at once, paced at 20 requests/s:
    the queue is never empty, and each head is booked by the settle before it. Without booking,
    each head comes back at its fit time: about two acquires per request."""
    calls, threads = 10, 3
    results = results_of_processes(_paced, (redis_url, name, calls, threads), 2, 90)
    requests = calls * threads
    for _, counts in results:
        assert counts.get("settle") == requests, counts
        assert requests <= counts.get("acquire", 0) <= 1.25 * requests, f"heads came back for their grants: {counts}"


#: status.lua's reply for a budget with no pause in force (what a waiter asks after a reconnect)
NO_PAUSE = ["100.1", "0", "0", "1", "0", "0.000000", "0", "60", "0", "0", "0", "0"]


def _drive(flow: Any, answers: list[Any]) -> list[Any]:
    """Run an acquire flow, answering its steps in turn (None to a wait: after its timeout); the steps
    it took, and how it ended."""
    steps: list[Any] = []
    step = next(flow)
    try:
        for answer in answers:
            steps.append(step)
            if answer is None and isinstance(step, AwaitNotice):
                time.sleep(step.timeout)
            step = flow.send(answer)
        steps.append(step)
    except StopIteration:
        steps.append("returned")
    except AcquireTimeout as exc:
        steps.append(exc)
    return steps


def test_a_booking_after_the_deadline_is_given_back_at_the_deadline() -> None:
    flow = acquire_flow(Budget("b", rps=1), "p.1", 1, 0, 0.3, 30.0, False, ANYWHERE)
    booked = GrantNotice("p.1", True, 5.0, time.monotonic())
    steps = _drive(flow, [["queued", "1.000000", "100.000000"], booked, None, None, None])
    assert isinstance(steps[0], RunScript) and steps[0].argv[-1] == "1", "a classless call books"
    assert isinstance(steps[2], AwaitNotice) and steps[2].timeout <= 0.3, "it slept past the deadline"
    assert isinstance(steps[3], GiveBack)
    assert isinstance(steps[4], AcquireTimeout)


def test_a_booking_waits_out_a_pause_announced_meanwhile() -> None:
    flow = acquire_flow(Budget("b", rps=1), "p.1", 1, 0, None, 30.0, False, ANYWHERE)
    now = time.monotonic()
    steps = _drive(flow, [["queued", "1.000000", "100.000000"], GrantNotice("p.1", True, 0.05, now),
                          CooldownNotice(3.0, now)])  # fmt: skip
    assert isinstance(steps[3], AwaitNotice) and steps[3].timeout > 2.5, "the pause did not hold the booking"
    notice = parse(b"g p.1 100.000000 f 100.250000")
    assert isinstance(notice, GrantNotice) and notice.firm and notice.delay == pytest.approx(0.25)


def test_a_booking_asked_for_again_keeps_the_pause_it_heard() -> None:
    """A renewal round or a reconnect sends a booked waiter back to Redis while a pause holds it: the
    lease's start has passed by then, but the waiter still waits for the pause to end."""
    flow = acquire_flow(Budget("b", rps=1), "p.1", 1, 0, None, 30.0, False, ANYWHERE)
    now = time.monotonic()
    steps = _drive(flow, [["queued", "1.000000", "100.000000"], GrantNotice("p.1", True, 0.05, now),
                          CooldownNotice(3.0, now), Resubscribed(),
                          ["granted", "100.050000", "100.100000", "130.050000"], NO_PAUSE])  # fmt: skip
    assert isinstance(steps[4], RunScript) and steps[4].op == "acquire", "the waiter did not ask again"
    assert isinstance(steps[6], AwaitNotice) and steps[6].timeout > 2.5, "it started within the pause"


def test_a_booking_asked_for_again_keeps_the_deadline() -> None:
    flow = acquire_flow(Budget("b", rps=1), "p.1", 1, 0, 0.3, 30.0, False, ANYWHERE)
    now = time.monotonic()
    steps = _drive(flow, [["queued", "1.000000", "100.000000"], GrantNotice("p.1", True, 5.0, now), Resubscribed(),
                          ["granted", "105.000000", "100.100000", "135.000000"], NO_PAUSE, None, None])  # fmt: skip
    assert isinstance(steps[3], RunScript)
    assert isinstance(steps[5], AwaitNotice) and steps[5].timeout <= 0.3, "it slept past the deadline"
    assert isinstance(steps[6], GiveBack) and isinstance(steps[7], AcquireTimeout)


def test_a_grant_asked_for_after_a_reconnect_waits_for_a_pause_whose_notice_was_lost() -> None:
    """A reconnect loses what was published meanwhile, a pause's notice too: the grant the waiter
    then finds (booked, its start passed) asks Redis whether a pause is in force, and holds for it."""
    flow = acquire_flow(Budget("b", rps=1), "p.1", 1, 0, None, 30.0, False, ANYWHERE)
    status = [*NO_PAUSE[:5], "2.000000", *NO_PAUSE[6:]]  # a pause of 2 s in force
    steps = _drive(flow, [["queued", "1.000000", "100.000000"], Resubscribed(),
                          ["granted", "100.050000", "100.100000", "130.050000"], status])  # fmt: skip
    assert isinstance(steps[2], RunScript) and steps[2].op == "acquire"
    assert isinstance(steps[3], RunScript) and steps[3].op == "status", "it did not ask for a pause"
    assert isinstance(steps[4], AwaitNotice) and steps[4].timeout > 1.5, "it started within the pause"
