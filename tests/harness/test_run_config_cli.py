"""The examples' command lines reach every RunConfig field, Ray placement included."""

from __future__ import annotations

import tyro

from evochi_torch.harness import RunConfig
from evochi_torch.ray import RayPlacement


def test_ray_placement_is_a_cli_choice_and_local_processes_the_default() -> None:
    assert tyro.cli(RunConfig, args=[]).ray is None
    run = tyro.cli(
        RunConfig,
        args=["--workers", "3", "ray:ray-placement", "--ray.num-workers", "8",
              "--ray.gpus-per-worker", "0.5"],
    )  # fmt: skip
    assert run.ray == RayPlacement(num_workers=8, gpus_per_worker=0.5)
    assert run.workers == 3
