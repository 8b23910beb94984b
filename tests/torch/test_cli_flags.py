"""`evochi-torch`'s flags are generated from ESConfig and RunConfig: one flag per field, spelled
as in the examples (``--es.sigma``, ``--run.max-epochs``), with the flat spellings as
deprecated aliases that reach the same config."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from evochi_torch import ESConfig
from evochi_torch.cli import build_parser, flags
from evochi_torch.cli.commands import RUN_DEST
from evochi_torch.harness import RunConfig

WORKER = ["worker", "toy_workers:ToyRegression", "--server", "127.0.0.1:1"]
TRAIN = ["train", "toy_workers:ToyRegression"]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each alias warns once per process; every test starts from none warned.
    monkeypatch.setattr(flags, "_warned", set())


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _options(command: str) -> set[str]:
    return {o for a in _subparser(command)._actions for o in a.option_strings}


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def _es(*argv: str) -> ESConfig:
    args = build_parser().parse_args([*WORKER, *argv])
    return ESConfig(population_size=24, **flags.es_overrides(args))


def _run(*argv: str) -> dict[str, object]:
    return flags.given_fields(build_parser().parse_args([*TRAIN, *argv]), RUN_DEST)


@pytest.mark.parametrize("command", ["train", "worker"])
def test_every_es_config_field_is_a_flag_documented_in_help(command, capsys) -> None:
    options = _options(command)
    text = _help(command, capsys)
    docs = flags.field_docs(ESConfig)
    for f in dataclasses.fields(ESConfig):
        if f.name == "strategy_options":
            continue  # one flag per strategy option: --es.strategy-options.NAME
        flag = "--es." + f.name.replace("_", "-")
        assert flag in options, flag
        assert flag in text, flag
        # The field's own documentation is its help (the first words, markup aside).
        words = " ".join(flags._plain(docs[f.name]).split()[:4])
        assert words[1:] in text, (f.name, words)


def test_every_run_config_field_is_a_train_flag_documented_in_help(capsys) -> None:
    options = _options("train")
    text = _help("train", capsys)
    docs = flags.field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name == "ray":
            continue  # --ray / --num-workers / --gpus-per-worker: the Ray group
        flag = "--run." + f.name.replace("_", "-")
        assert flag in options, flag
        assert " ".join(docs[f.name].split()[:4])[1:] in text, f.name


def test_a_deprecated_alias_reaches_the_same_config_and_warns_once(capsys) -> None:
    new = _es("--es.sigma", "0.1", "--es.no-antithetic", "--es.betas", "0.5", "0.6")
    assert capsys.readouterr().err == ""
    old = _es("--sigma", "0.1", "--no-antithetic", "--betas", "0.5", "0.6")
    assert old == new
    assert (new.sigma, new.antithetic, new.betas) == (0.1, False, (0.5, 0.6))
    err = capsys.readouterr().err.splitlines()
    assert "warning: --sigma is deprecated; use --es.sigma" in err
    assert "warning: --no-antithetic is deprecated; use --es.no-antithetic" in err
    assert len(err) == 3  # one line per alias
    _es("--sigma", "0.2")
    assert capsys.readouterr().err == ""  # once per process


def test_strategy_options_have_the_examples_spelling_and_their_old_one(capsys) -> None:
    new = _es("--es.strategy", "cem", "--es.strategy-options.elite-fraction", "0.2")
    old = _es("--strategy", "cem", "--elite-fraction", "0.2")
    assert new == old and new.strategy_options == {"elite_fraction": 0.2}
    assert "--elite-fraction is deprecated" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="elite_fraction.*cem"):
        _es("--es.strategy", "pgpe", "--es.strategy-options.elite-fraction", "0.2")


def test_run_flags_and_their_aliases(capsys) -> None:
    new = _run("--run.max-epochs", "3", "--run.run-dir", "x", "--run.quiet",
               "--run.loggers", "tensorboard", "wandb", "--run.target", "1.5")  # fmt: skip
    old = _run("--max-epochs", "3", "--run-dir", "x", "--quiet",
               "--logger", "csv,tensorboard,wandb", "--target", "1.5")  # fmt: skip
    expected = {"max_epochs": 3, "run_dir": Path("x"), "quiet": True,
                "loggers": ("tensorboard", "wandb"), "target": 1.5}  # fmt: skip
    assert new == old == expected
    RunConfig(**new)  # the values are RunConfig's own
    assert "--logger is deprecated" in capsys.readouterr().err
    assert _run() == {}  # unset: the command's defaults apply


def test_a_field_added_to_a_dataclass_becomes_a_flag_by_itself() -> None:
    @dataclass
    class Settings:
        """Attributes:
        rate: from the class docstring.
        """

        rate: float = 0.5
        mode: str = "fast"
        """from a string below the field"""
        on: bool = True

    parser = argparse.ArgumentParser(formatter_class=flags.Formatter)
    added = flags.add_dataclass_flags(parser, Settings, prefix="s.", dest="s_", alias=["rate"])
    assert added == ["--s.rate", "--rate", "--s.mode", "--s.on", "--s.no-on"]
    args = parser.parse_args(["--s.mode", "slow", "--s.no-on", "--s.rate", "2"])
    assert flags.given_fields(args, "s_") == {"mode": "slow", "on": False, "rate": 2.0}
    text = " ".join(parser.format_help().split())
    assert "From the class docstring" in text and "From a string below the field" in text
    assert "(deprecated alias: --rate)" in text and "Default: fast" in text
