"""A digits classifier trained with distributed ES: see digits.py."""

from examples.digits.digits import Args, Digits, run

__all__ = ["Args", "Digits", "run"]
