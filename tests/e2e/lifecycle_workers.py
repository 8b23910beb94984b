"""Workers for the launcher's signal tests (importable by spawned worker processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from toy_workers import ToyRegression


class SlowEvaluation(ToyRegression):
    """Each evaluation takes minutes; it touches ``$EVOCHI_TEST_MARKERS/evaluating-<pid>``
    when it starts, so that a test knows the process is in the middle of one."""

    def score(self, policy, epoch, members):
        markers = os.environ.get("EVOCHI_TEST_MARKERS")
        if markers:
            Path(markers, f"evaluating-{os.getpid()}").touch()
        time.sleep(600)
        return super().score(policy, epoch, members)
