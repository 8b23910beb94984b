"""Names that a module no longer offers but still resolves, each from the module that owns it."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def forwarding_getattr(module: str, owners: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``module``: a name in ``owners`` resolves from the
    module that owns it, with a DeprecationWarning naming that module, so that code using
    it keeps working while it moves to the import the warning names."""

    def __getattr__(name: str) -> Any:
        owner = owners.get(name)
        if owner is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} is not part of {module}'s public names; import it from {owner}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(owner), name)

    return __getattr__
