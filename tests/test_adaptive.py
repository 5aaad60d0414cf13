"""The per-endpoint concurrency controller: plain logic, time passed in."""

from __future__ import annotations

from caption_flow.engines.adaptive import DECREASE, AdaptiveLimit, parse_retry_after


def fill(limit: AdaptiveLimit, now: float) -> list:
    tickets = []
    while limit.can_start(now):
        tickets.append(limit.start(now))
    return tickets


def test_doubles_per_round_until_the_first_cut_then_grows_by_about_one() -> None:
    limit = AdaptiveLimit(2, 64)
    for expected in (2, 4, 8):  # slow start: each success adds one
        tickets = fill(limit, 0.0)
        assert len(tickets) == expected
        for ticket in tickets:
            limit.succeeded(ticket, 0.0)
    assert limit.limit == 16.0
    limit.failed(limit.start(1.0), 1.0, overloaded=True)
    assert limit.limit == 16.0 * DECREASE and limit.cuts == 1
    for _ in range(3):  # additive now: +1/limit per success, about one per round
        for ticket in fill(limit, 2.0):
            limit.succeeded(ticket, 2.0)
    cut = 16.0 * DECREASE
    assert cut + 2.5 <= limit.limit < cut + 3.0
    for _ in range(200):
        for ticket in fill(limit, 3.0):
            limit.succeeded(ticket, 3.0)
    assert limit.limit == 64.0 and limit.max_in_flight == 64 and limit.peak == 64.0


def test_cuts_once_per_round_of_overload_and_never_below_one() -> None:
    limit = AdaptiveLimit(8, 8)
    tickets = fill(limit, 0.0)
    assert len(tickets) == 8
    for ticket in tickets:  # eight failures of one round: one cut, not eight
        limit.failed(ticket, 1.0, overloaded=True)
    assert limit.limit == 8.0 * DECREASE and limit.cuts == 1
    for round_ in range(40):  # each later round: all fail, one more cut, floor at one
        now = 2.0 + round_
        for ticket in fill(limit, now):
            limit.failed(ticket, now + 0.5, overloaded=True)
    assert limit.limit == 1.0 and limit.cuts == 41
    assert limit.can_start(10.0), "never so low that nothing may start"


def test_a_failure_that_is_not_overload_does_not_shrink() -> None:
    limit = AdaptiveLimit(4, 8)
    ticket = limit.start(0.0)
    limit.failed(ticket, 0.1, overloaded=False)
    assert limit.limit == 4.0 and limit.in_flight == 0


def test_retry_after_blocks_new_starts_until_it_has_passed() -> None:
    limit = AdaptiveLimit(4, 8)
    ticket = limit.start(10.0)
    limit.failed(ticket, 10.0, overloaded=True, retry_after=2.5)
    assert not limit.can_start(11.0)
    assert limit.delay(11.0) == 1.5
    assert limit.can_start(12.5)


def test_requests_per_minute_caps_starts_in_a_sliding_window() -> None:
    limit = AdaptiveLimit(10, 10, requests_per_minute=3)
    for t in (0.0, 1.0, 2.0):
        limit.succeeded(limit.start(t), t)
    assert not limit.can_start(30.0)
    assert limit.delay(30.0) == 30.0
    assert limit.can_start(60.0)


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("9999") == 300.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None and parse_retry_after("nan") is None
    assert parse_retry_after(None) is None


def test_remembers_starts_only_for_a_rate_and_only_for_its_window() -> None:
    """A long-lived engine starts millions of requests: what is kept per start must stay
    bounded (it grew by one float per request while no rate was set)."""
    unlimited = AdaptiveLimit(4, 4)
    rated = AdaptiveLimit(4, 4, requests_per_minute=30)
    for second in range(10_000):
        for limit in (unlimited, rated):
            if limit.can_start(float(second)):
                limit.succeeded(limit.start(float(second)), float(second))
    assert len(unlimited._starts) == 0
    assert len(rated._starts) <= 30
