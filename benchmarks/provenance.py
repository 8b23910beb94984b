"""Where a benchmark result comes from: the command, the commit, the machine (CPU model,
cores) and the library versions, as each result's meta.json records them."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

UNRECORDED = "unrecorded"
ROOT = Path(__file__).resolve().parents[1]
#: Libraries whose versions change what a run computes or how fast.
LIBRARIES = ("evochi", "torch", "numpy", "mujoco", "gymnasium")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNRECORDED


def machine() -> dict[str, Any]:
    """The machine as a result records it: CPU model, logical cores, cores this process may
    use, operating system."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count()
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "cores_available": available,
            "system": f"{platform.system()} {platform.release()}"}  # fmt: skip


def versions() -> dict[str, str]:
    """Python's and `LIBRARIES`' versions."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = UNRECORDED
    return found


def commit() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (a dirty tree)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": UNRECORDED, "dirty": None}


def provenance(command: Sequence[str]) -> dict[str, Any]:
    """What meta.json says about a result made now by `command` on this machine."""
    try:
        # Other jobs on the machine slow a run and its limit alike: say how busy it was.
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = UNRECORDED
    return {
        "command": " ".join(command),
        **commit(),
        "machine": machine(),
        "versions": versions(),
        "recorded": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "load_average_1_5_15_min": load,
    }
