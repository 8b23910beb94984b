"""The `evochi-torch` command line, in one place.

* :mod:`~evochi_torch.cli.flags`: flags generated from `ESConfig`, `RunConfig`, the strategies'
  options and the Ray placement (``--es.sigma``, ``--run.max-epochs``), with the flat
  spellings as deprecated aliases;
* :mod:`~evochi_torch.cli.commands`: `train`, `worker`, `play`, `export` and `main`.
"""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
