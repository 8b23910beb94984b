"""Command-line flags generated from dataclasses: `ESConfig`, `RunConfig`, each strategy's
``Options``, and the Ray placement.

A flag is spelled as the field it sets, the way the examples' tyro command lines spell it:
``--es.sigma`` sets ``ESConfig.sigma``, ``--run.max-epochs`` sets ``RunConfig.max_epochs``,
``--es.strategy-options.elite-fraction`` sets ``ESConfig.strategy_options["elite_fraction"]``.
Flags and their help come from the fields by reflection (types, defaults and docstrings), so a
field added to a dataclass is a flag without further code.

The flat spellings of earlier command lines (``--sigma``, ``--max-epochs``, ``--elite-fraction``)
still work as deprecated aliases of the same flag: using one prints a one-line warning that
names its replacement. ``--help`` shows the new spelling, with the alias in its text.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Formatter",
    "add_dataclass_flags",
    "add_es_flags",
    "add_ray_flags",
    "add_strategy_flags",
    "es_overrides",
    "field_docs",
    "given_fields",
    "strategy_overrides",
]

ES_DEST = "es_"
STRATEGY_DEST = "strategy_opt_"


# --------------------------------------------------------------------------- field docs
def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: a string right below the field (what tyro shows), else
    its entry in the class docstring's ``Attributes:``/``Args:`` section; one line each."""
    docs = _docstring_section(inspect.getdoc(cls) or "")
    with_attribute_docs: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        source = ""
    if source:
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                with_attribute_docs[node.target.id] = " ".join(after.value.value.split())
    docs.update(with_attribute_docs)
    return docs


def _docstring_section(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` or ``Args:`` section."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    inside = False
    entry_indent = None
    for line in doc.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped in ("Attributes:", "Args:"):
            inside, entry_indent, current = True, None, None
            continue
        if not inside:
            continue
        if not stripped:
            continue
        if entry_indent is None:
            entry_indent = indent
        if indent < entry_indent:
            inside = False
            continue
        name, colon, text = stripped.partition(":")
        if indent == entry_indent and colon and name.isidentifier():
            current = found.setdefault(name, [])
            current.append(text.strip())
        elif current is not None:
            current.append(stripped)
    return {name: " ".join(" ".join(parts).split()) for name, parts in found.items()}


# --------------------------------------------------------------------------- the flag action
class _Flag(argparse.Action):
    """Stores a field's value; a deprecated alias warns once and names the new spelling.

    Booleans take no value: ``--es.antithetic`` / ``--es.no-antithetic`` (tyro's spelling)."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        shown: Sequence[str],
        negative: Sequence[str] = (),
        convert: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.shown = list(shown)
        self.negative = set(negative)
        self.convert = convert

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string is not None and option_string not in self.shown:
            use = self.shown[1] if option_string in self.negative else self.shown[0]
            _deprecated(option_string, use)
        if self.nargs == 0:
            values = option_string not in self.negative
        elif self.convert is not None:
            values = self.convert(values)
        setattr(namespace, self.dest, values)


_warned: set[str] = set()


def _deprecated(old: str, new: str) -> None:
    if old not in _warned:
        _warned.add(old)
        print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)


class Formatter(argparse.HelpFormatter):
    """Shows a flag under its current spelling only (its deprecated alias is in its help),
    and never breaks a line inside a flag's name (``--sigma-learning-rate`` stays whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = getattr(action, "shown", None)
        if not shown or not action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return ", ".join(shown)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{s} {metavar}" for s in shown)


# --------------------------------------------------------------------------- from a dataclass
def _flag_name(prefix: str, name: str) -> str:
    return "--" + prefix + name.replace("_", "-")


def _negated(prefix: str, name: str) -> str:
    return "--" + prefix + "no-" + name.replace("_", "-")


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str,
    dest: str,
    fields: Iterable[str] | None = None,
    alias: bool | Iterable[str] = False,
    helps: Mapping[str, str] | None = None,
    kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    default_text: str = "Default: {}",
) -> list[str]:
    """One flag per field of the dataclass `cls` (or those named in `fields`), spelled
    ``--{prefix}{field-name}``, storing into ``{dest}{field_name}`` (None: not given).

    ``alias``: also accept ``--{field-name}`` as a deprecated alias (True: for every field,
    else for the fields named). ``helps``: text after a field's doc that replaces its
    default (e.g. a command's own default); ``default_text``: how the field's default is
    shown; ``kwargs``: argparse arguments that replace the generated ones for a field. Fields
    whose type has no flag (a mapping, a nested dataclass) are skipped. Returns the flags
    added, aliases included."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    wanted = None if fields is None else list(fields)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    aliased = set(by_name) if alias is True else set(alias or ())
    added: list[str] = []
    for name in wanted if wanted is not None else list(by_name):
        f = by_name[name]
        with_alias = name in aliased and bool(prefix)
        spec = _type_kwargs(hints[name])
        if spec is None:
            continue
        spec.update((kwargs or {}).get(name, {}))
        shown = [_flag_name(prefix, name)]
        options = list(shown)
        negative: list[str] = []
        if spec.get("nargs") == 0:
            shown.append(_negated(prefix, name))
            negative.append(shown[1])
            options.append(shown[1])
            if with_alias:
                negative.append(_negated("", name))
                options += [_flag_name("", name), negative[-1]]
        elif with_alias:
            options.append(_flag_name("", name))
        default = _default(f)
        text = _plain(docs.get(name, "")) or name.replace("_", " ")
        text = text[:1].upper() + text[1:]
        extra = (helps or {}).get(name)
        if extra is None:
            missing = default is dataclasses.MISSING
            extra = default_text.format("none" if missing else default)
        aliases = [o for o in options if o not in shown]
        help_text = f"{text.rstrip('.')}. {extra}"
        if aliases:
            help_text += f" (deprecated alias: {', '.join(aliases)})"
        parser.add_argument(
            *options,
            action=_Flag,
            dest=dest + name,
            default=None,
            shown=shown,
            negative=negative,
            help=help_text.replace("%", "%%"),
            **spec,
        )
        added += options
    return added


def _plain(doc: str) -> str:
    """A docstring's reStructuredText markup as plain text for ``--help``."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return doc.replace("``", "`")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    if isinstance(value, tuple) and not value:
        return "none"
    return value


def _type_kwargs(hint: Any) -> dict[str, Any] | None:
    """argparse arguments for a field of type `hint`; None: no flag for this type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if len(args) != 1:
            return None
        return _type_kwargs(args[0])
    if hint is bool:
        return {"nargs": 0}
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(hint))}
    if origin is tuple:
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            return {"nargs": "*", "type": items[0], "metavar": _metavar(items[0]), "convert": tuple}
        if items and all(i is items[0] for i in items):
            return {
                "nargs": len(items),
                "type": items[0],
                "metavar": _metavar(items[0]),
                "convert": tuple,
            }
        return None
    if hint in (int, float, str, Path):
        return {"type": hint, "metavar": _metavar(hint)}
    return None


def _metavar(hint: Any) -> str:
    return getattr(hint, "__name__", "VALUE").upper()


def given_fields(args: argparse.Namespace, dest: str) -> dict[str, Any]:
    """The fields given on the command line (flags stored under ``dest``)."""
    return {
        key[len(dest) :]: value
        for key, value in vars(args).items()
        if key.startswith(dest) and value is not None
    }


# --------------------------------------------------------------------------- ES hyper-parameters
def add_es_flags(parser: argparse.ArgumentParser, strategy_choices: bool = True) -> None:
    """``--es.FIELD`` for every `ESConfig` field (unset: the worker class's default_config),
    ``--es.strategy-options.OPTION`` for every registered strategy's options."""
    from evochi_torch.config import ESConfig
    from evochi_torch.strategies import STRATEGIES

    group = parser.add_argument_group(
        "ES hyper-parameters (ESConfig; unset: the worker class's default_config)"
    )
    strategy: dict[str, Any] = {"metavar": None}
    if strategy_choices:
        strategy["choices"] = sorted(STRATEGIES)
    add_dataclass_flags(
        group,
        ESConfig,
        prefix="es.",
        dest=ES_DEST,
        alias=True,
        helps={
            "strategy": "Or one that MODULE registers (docs/strategies.md). Default: the "
            "class's default_config",
        },
        kwargs={"strategy": strategy},
        default_text="Default: the class's default_config (ESConfig's: {})",
    )
    add_strategy_flags(parser)


def _options() -> dict[str, list[tuple[str, dataclasses.Field[Any], Any]]]:
    """option name -> [(strategy, field, type hint)] over the strategy registry."""
    from evochi_torch.strategies import STRATEGIES

    found: dict[str, list[tuple[str, dataclasses.Field[Any], Any]]] = {}
    for name, strategy in STRATEGIES.items():
        hints = typing.get_type_hints(strategy.Options)
        for f in dataclasses.fields(strategy.Options):
            found.setdefault(f.name, []).append((name, f, hints[f.name]))
    return found


def add_strategy_flags(parser: argparse.ArgumentParser) -> None:
    """One group per registered strategy with its options: a flag given goes into
    ``ESConfig.strategy_options`` (replacing the class's); one of another strategy than the
    one selected is an error naming the strategies it belongs to."""
    from evochi_torch.strategies import STRATEGIES

    groups: dict[str, argparse._ArgumentGroup] = {}
    prefix = "es.strategy-options."
    for option, owners in sorted(_options().items()):
        strategy, f, hint = owners[0]
        group = groups.get(strategy)
        if group is None:
            module = sys.modules[type(STRATEGIES[strategy]).__module__]
            doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            group = groups[strategy] = parser.add_argument_group(
                f"options of --strategy {strategy}", (doc or "").replace("%", "%%") or None
            )
        spec = _type_kwargs(hint) or {"type": str}
        shown = [_flag_name(prefix, option)]
        options = [*shown, _flag_name("", option)]
        negative: list[str] = []
        if spec.get("nargs") == 0:
            shown.append(_negated(prefix, option))
            negative = [shown[1], _negated("", option)]
            options = [shown[0], shown[1], _flag_name("", option), negative[1]]
        names = ", ".join(o[0] for o in owners)
        what = f.metadata.get("help", "")
        aliases = ", ".join(o for o in options if o not in shown)
        text = f"({names}) {what}; default: {f.default} (deprecated alias: {aliases})"
        group.add_argument(
            *options,
            action=_Flag,
            dest=STRATEGY_DEST + option,
            default=None,
            shown=shown,
            negative=negative,
            help=text.replace(" ; ", " ").replace("%", "%%"),
            **spec,
        )


def strategy_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The strategy options given, as ``{"strategy_options": {...}}`` (empty: none given)."""
    given = given_fields(args, STRATEGY_DEST)
    if not given:
        return {}
    chosen = getattr(args, ES_DEST + "strategy", None)
    if chosen is not None:
        owners = _options()
        wrong = [k for k in given if chosen not in [o[0] for o in owners[k]]]
        if wrong:
            where = {k: [o[0] for o in owners[k]] for k in wrong}
            raise SystemExit(
                f"error: option(s) {where} do not apply to --es.strategy {chosen} "
                f"(they belong to the strategies listed)"
            )
    return {"strategy_options": given}


def es_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `ESConfig` fields given on the command line, strategy options included."""
    overrides = given_fields(args, ES_DEST)
    overrides.update(strategy_overrides(args))
    return overrides


# --------------------------------------------------------------------------- Ray
def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """The `--ray` flags of `evochi-torch train` and `evochi-torch worker`."""
    from evochi_torch.ray import RayPlacement

    group = parser.add_argument_group(
        "Ray (pip install 'evochi[ray]'): worker actors placed by a Ray cluster"
    )
    group.add_argument(
        "--ray",
        metavar="auto|local|ADDRESS",
        default=None,
        help="start the workers as Ray actors: 'auto' joins the Ray cluster of this "
        "machine (RAY_ADDRESS or `ray start`), 'local' starts a private one, ADDRESS is "
        "a cluster's HOST:6379 or ray://HOST:10001. Actors whose process dies are "
        "restarted by Ray and join again. Default: no Ray",
    )
    add_dataclass_flags(
        group,
        RayPlacement,
        prefix="",
        dest="ray_",
        fields=("num_workers", "gpus_per_worker", "cpus_per_worker"),
        helps={
            "num_workers": "Required with --ray",
            "cpus_per_worker": "Also each actor's torch threads unless --threads. Default: 1",
        },
    )
