import pickle

import pytest

from evochi_torch import ESConfig


def test_defaults_are_valid_and_documented_values():
    cfg = ESConfig(population_size=8)
    assert cfg.sigma == 0.02
    assert cfg.strategy == "openai_es" and cfg.strategy_options == {}
    # None defaults resolve to the strategy's: OpenAI-ES with Adam, lr 0.01, centered ranks.
    assert cfg.optimizer is None and cfg.fitness_shaping is None and cfg.learning_rate is None
    assert (cfg.lr, cfg.shaping) == (0.01, "centered_rank")
    assert cfg.antithetic is True
    assert cfg.noise_table_size is None
    assert cfg.nan_penalty is None


def test_pickle_round_trip_is_equal():
    cfg = ESConfig(population_size=10, sigma=0.1, optimizer="sgd", seed=7, nan_penalty=-1.0)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_odd_population_with_antithetic_is_rejected_clearly():
    with pytest.raises(ValueError, match="even"):
        ESConfig(population_size=7)
    assert ESConfig(population_size=7, antithetic=False).population_size == 7


def test_betas_list_is_normalised():
    assert ESConfig(population_size=2, betas=[0.8, 0.9]).betas == (0.8, 0.9)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("population_size", 0, "population_size"),
        ("population_size", 4.0, "population_size"),
        ("sigma", 0.0, "sigma"),
        ("sigma", float("nan"), "sigma"),
        ("learning_rate", -1.0, "learning_rate"),
        ("optimizer", "rmsprop", "optimizer"),
        ("momentum", 1.0, "momentum"),
        ("betas", (0.9,), "betas"),
        ("betas", (0.9, 1.0), "betas"),
        ("eps", 0.0, "eps"),
        ("weight_decay", -0.1, "weight_decay"),
        ("weight_decay", 1000.0, "weight_decay"),
        ("fitness_shaping", "rank", "fitness_shaping"),
        ("seed", -1, "seed"),
        ("strategy", "cma", "known strategies"),
        ("strategy_options", {"x": 1}, "unknown option"),
        ("max_speed", 0.0, "max_speed"),
        ("noise_table_size", 1, "noise_table_size"),
        ("nan_penalty", float("inf"), "nan_penalty"),
        ("antithetic", 1, "antithetic"),
    ],
)
def test_invalid_values_are_rejected(field, value, match):
    kwargs = {"population_size": 4, field: value}
    with pytest.raises(ValueError, match=match):
        ESConfig(**kwargs)


def test_replace_revalidates():
    cfg = ESConfig(population_size=4)
    assert cfg.replace(sigma=0.5).sigma == 0.5
    with pytest.raises(ValueError, match="even"):
        cfg.replace(population_size=5)
