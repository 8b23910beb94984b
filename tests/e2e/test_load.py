"""CI-sized version of benchmarks/load.py: churn never loses or double-counts a reward."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.load import run_load


@pytest.mark.timeout(120)
def test_churn_loses_and_duplicates_nothing(caplog: pytest.LogCaptureFixture) -> None:
    result = asyncio.run(run_load(workers=16, epochs=60, population=2000, churn_every=3))
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    # Workers closed mid-task must leave nothing running behind them.
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == []
