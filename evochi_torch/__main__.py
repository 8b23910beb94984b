"""`python -m evochi_torch` and the `evochi-torch` script: see `evochi_torch.cli`."""

from __future__ import annotations

import sys

from evochi_torch.cli.commands import build_parser, main
from evochi_torch.cli.flags import es_overrides as _config_overrides  # noqa: F401 (tests' name)

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
