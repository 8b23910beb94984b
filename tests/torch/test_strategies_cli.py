"""`--strategy` and the strategies' own options on `evochi-torch train/worker`."""

from __future__ import annotations

import pytest

from evochi_torch import ESConfig
from evochi_torch.__main__ import _config_overrides, build_parser


def _config(*flags: str) -> ESConfig:
    args = build_parser().parse_args(
        ["worker", "toy_workers:ToyRegression", "--server", "127.0.0.1:1", *flags]
    )
    return ESConfig(population_size=24, **_config_overrides(args))


def test_strategy_and_its_options_reach_the_config():
    cfg = _config("--strategy", "pgpe", "--stdev-max-change", "0.3", "--learning-rate", "0.2")
    assert cfg.strategy == "pgpe"
    assert cfg.strategy_options == {"stdev_max_change": 0.3}
    assert cfg.lr == 0.2
    cfg = _config("--strategy", "ars", "--top-directions", "4", "--no-reward-std-scaling")
    assert cfg.strategy_options == {"top_directions": 4, "reward_std_scaling": False}
    assert _config("--optimizer", "clipup", "--max-speed", "0.5").max_speed == 0.5


def test_an_option_of_another_strategy_is_refused_with_its_owner():
    with pytest.raises(SystemExit, match="elite_fraction.*cem"):
        _config("--strategy", "pgpe", "--elite-fraction", "0.2")


def test_help_lists_every_strategy_and_its_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for text in ("--strategy", "openai_es", "sep_cma", "options of --strategy pgpe",
                 "--stdev-learning-rate", "--elite-fraction", "--top-directions", "--mu",
                 "--sigma-learning-rate", "--max-speed"):  # fmt: skip
        assert text in out, text
    assert "--device " not in out  # a worker setting (--devices), not an ES hyper-parameter
