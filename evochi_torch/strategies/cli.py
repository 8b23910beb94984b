"""Command-line flags for ``--strategy`` and every registered strategy's own options.

Each strategy gets an argument group in ``--help`` listing its options with their defaults
(``--elite-fraction`` for CEM, ``--top-directions`` for ARS...). A flag given on the command
line goes into ``ESConfig.strategy_options`` (replacing the worker class's
``default_config.strategy_options``); a flag of another strategy than the one selected is an
error that names the strategies it belongs to.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from . import STRATEGIES

__all__ = ["add_strategy_flags", "strategy_overrides"]

_PREFIX = "strategy_opt_"


def _options() -> dict[str, list[tuple[str, dataclasses.Field, Any]]]:
    """option name -> [(strategy, field, type hint)] over the registry."""
    found: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for name, strategy in STRATEGIES.items():
        hints = typing.get_type_hints(strategy.Options)
        for f in dataclasses.fields(strategy.Options):
            found.setdefault(f.name, []).append((name, f, hints[f.name]))
    return found


def add_strategy_flags(parser: argparse.ArgumentParser, reserved: set[str] | None = None) -> None:
    """Add one group per strategy with its options (``reserved``: flag names already taken)."""
    reserved = reserved or set()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option, owners in sorted(_options().items()):
        flag = "--" + option.replace("_", "-")
        if flag in reserved:
            raise RuntimeError(f"strategy option {option!r} collides with the flag {flag}")
        strategy, f, hint = owners[0]
        group = groups.get(strategy)
        if group is None:
            module = sys.modules[type(STRATEGIES[strategy]).__module__]
            doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            group = groups[strategy] = parser.add_argument_group(
                f"options of --strategy {strategy}", doc or None
            )
        kwargs: dict[str, Any] = {"dest": _PREFIX + option, "default": None}
        kwargs["metavar"] = option.upper()
        scalar = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if scalar[0] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            del kwargs["metavar"]
        else:
            kwargs["type"] = scalar[0]
        names = ", ".join(o[0] for o in owners)
        what = f.metadata.get("help", "")
        kwargs["help"] = f"({names}) {what}; default: {f.default}".replace(" ; ", " ")
        group.add_argument(flag, **kwargs)


def strategy_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The strategy options given on the command line, as ``{"strategy_options": {...}}``
    (empty when none were given)."""
    given = {
        key[len(_PREFIX) :]: value
        for key, value in vars(args).items()
        if key.startswith(_PREFIX) and value is not None
    }
    if not given:
        return {}
    chosen = getattr(args, "es_strategy", None)
    if chosen is not None:
        owners = _options()
        wrong = [k for k in given if chosen not in [o[0] for o in owners[k]]]
        if wrong:
            where = {k: [o[0] for o in owners[k]] for k in wrong}
            raise SystemExit(
                f"error: option(s) {where} do not apply to --strategy {chosen} "
                f"(they belong to the strategies listed)"
            )
    return {"strategy_options": given}
