"""ES outside RL: the digits example trains a classifier whose test accuracy rises."""

from __future__ import annotations

import pytest

from evochi_torch.harness import RunConfig
from examples.digits.digits import Args, Digits, run


@pytest.mark.timeout(300)
def test_digits_classifier_learns(tmp_path) -> None:
    result = run(Args(run=RunConfig(max_epochs=40, eval_every=20, runs_dir=tmp_path, quiet=True)))
    scores = [r["center_score"] for r in result.rows if r["center_score"] is not None]
    assert len(scores) == 2  # epochs 20 and 40
    # Ten classes: chance is about 0.1. Forty ES epochs reach well above it.
    assert scores[-1] > 0.6, scores
    assert result.rows[-1]["reward_mean"] > result.rows[0]["reward_mean"]
    assert (tmp_path / "digits-s0" / "best.safetensors").exists()
    assert Digits.default_config.population_size == 64
