"""benchmarks/lowrank.py at small sizes: the forward comparison runs both sides on the same
inputs (after checking that they agree), and the low-rank step's peak memory, measured in its
own process, stays within 2x of plain inference's."""

from __future__ import annotations

import re

import pytest

from benchmarks.lowrank import main


@pytest.mark.timeout(300)
def test_forward_and_peak_memory_at_small_sizes(capsys) -> None:
    small = ["--d-model", "128", "--layers", "2", "--members", "16", "--seqs", "4",
             "--tokens", "16", "--threads", "1"]  # fmt: skip
    main(["forward", "--regime", "wide", "--rounds", "1", *small])
    main(["peak", "--regime", "wide", *small])
    out = capsys.readouterr().out
    ratio = re.search(r"-> ([0-9.]+)x of inference", out)
    assert ratio and float(ratio.group(1)) > 0, out
    peak = re.search(r"plain inference (\d+) MiB .* low-rank step (\d+) MiB .* -> ([0-9.]+)x", out)
    assert peak, out
    plain, low, times = int(peak.group(1)), int(peak.group(2)), float(peak.group(3))
    assert plain > 0 and low > 0
    assert times == pytest.approx(low / plain, abs=0.02)
    assert times < 2.0, out
