"""The transformer example trains through the embedded server and two worker processes with
low-rank perturbations: the reward rises, the run directory holds a checkpoint whose center
loads into the model as a plain state dict."""

from __future__ import annotations

import pytest
import torch

from evochi_torch import load_policy
from evochi_torch.harness import RunConfig
from examples.transformer.transformer import Args, Reverse, SequenceModel, run


@pytest.mark.timeout(300)
def test_low_rank_es_trains_the_transformer_through_the_server(tmp_path) -> None:
    es = Reverse.default_config.replace(population_size=16)
    args = Args(es=es, run=RunConfig(max_epochs=6, eval_every=3, runs_dir=tmp_path, quiet=True))
    result = run(args)
    assert result.state.config.perturbation == "lowrank"
    assert result.state.epoch == 6
    rewards = [row["reward_mean"] for row in result.rows]
    assert rewards[-1] > rewards[0], rewards
    model = load_policy(SequenceModel(), result.run_dir / "checkpoint.safetensors")
    center = torch.nn.utils.parameters_to_vector(model.parameters())
    assert torch.equal(center, result.state.params)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
