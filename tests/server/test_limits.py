"""The budgets and the control budget's price list, on a clock the test controls."""

from __future__ import annotations

import dataclasses

import pytest

from evochi.server import limits
from evochi.server.limits import COSTS, Budget


def test_budget_fails_past_its_burst_and_drains_at_its_rate() -> None:
    budget = Budget(10.0, 5.0, now=100.0)
    assert all(budget.spend(100.0) for _ in range(5))
    assert not budget.spend(100.0)
    # 1 s drains 10: the bucket is empty again (never below zero).
    assert budget.spend(101.0)
    assert budget.level == 1.0
    assert budget.spend(101.0, cost=4.0)
    assert not budget.spend(101.0, cost=0.5)


def test_earning_lowers_the_level_but_never_below_zero() -> None:
    budget = Budget(1.0, 10.0, now=0.0)
    budget.spend(0.0, cost=9.0)
    budget.earn(COSTS.call_credit)
    assert budget.level == 1.0
    budget.earn(COSTS.call_credit)
    assert budget.level == 0.0


def test_a_drained_budget_can_be_forgotten() -> None:
    budget = Budget(*limits.JOIN_BUDGET, now=0.0)
    burst = int(limits.JOIN_BUDGET[1])
    for _ in range(burst):
        budget.spend(0.0)
    seconds = limits.JOIN_BUDGET[1] / limits.JOIN_BUDGET[0]
    assert not budget.drained(seconds)
    assert budget.drained(seconds + 0.01)


def test_price_list() -> None:
    prices = dataclasses.asdict(COSTS)
    assert prices["decode_unit"] == 256
    # Floods are what the budget is for: every frame that does no work costs something.
    free = [k for k, v in prices.items() if v <= 0]
    assert not free, free
    assert COSTS.header_block(0) == 1.0
    assert COSTS.header_block(512) == 3.0
    # Honest work must earn back at least what a gRPC client's control frames spend per call
    # (~3 WINDOW_UPDATEs) and per message (~1).
    assert COSTS.call_credit >= 3 * COSTS.window_update
    assert COSTS.message_credit >= COSTS.window_update
    with pytest.raises(dataclasses.FrozenInstanceError):
        COSTS.ping = 0.0  # type: ignore[misc]


def test_a_flood_of_free_frames_is_stopped_within_the_burst() -> None:
    rate, burst = limits.CONTROL_BUDGET
    budget = Budget(rate, burst, now=0.0)
    sent = 0
    while budget.spend(0.0, COSTS.ping):
        sent += 1
    assert sent == int(burst / COSTS.ping)
