"""`make gpu-check`: does every code path that touches CUDA work on this machine's GPU?

Five checks, one summary line each, within about 6 minutes on one GPU:

* cuda-tests: the CUDA-only tests (those with "cuda" in their name; they skip elsewhere);
* cartpole: `evochi-torch train examples.cartpole:CartPole --devices cuda:0`;
* population_forward: the batched-forward benchmark with its members on the device;
* es_update: one ES epoch the way a GPU worker runs it: the noise table copied to the device
  once, every epoch's perturbed parameters built there from (center, offsets, signs), the
  update on the host. It reports the host-to-device traffic per epoch, measured by the torch
  profiler (CUDA memcpy events), beside what building the members on the host would copy;
* lowrank: the low-rank population step of a transformer on the device against plain
  inference of the same module (``benchmarks.lowrank forward``, one token per member), after
  checking that the two agree as sigma goes to 0.

Without a GPU it prints why and exits 0. `--device cpu --quick` runs the same code paths
on the CPU with small sizes (the test suite does, so they cannot rot unnoticed).

    python -m benchmarks.gpu_check [--device cuda:0] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    if torch.version.cuda is None:
        return (
            f"this torch ({torch.__version__}) is a CPU-only build; on a GPU machine install "
            "a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return f"no CUDA device is visible{hint}"
    if (device.index or 0) >= torch.cuda.device_count():
        return f"{device} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
    return None


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f}s"
    return out.returncode, out.stdout + out.stderr


def _last_line(text: str, pattern: str) -> str:
    lines = [line for line in text.splitlines() if re.search(pattern, line)]
    return lines[-1].strip() if lines else (text.strip().splitlines() or ["(no output)"])[-1]


def check_cuda_tests(device: torch.device, quick: bool) -> tuple[bool, str]:
    if device.type != "cuda":
        return True, "not applicable on the CPU (the CUDA-only tests skip there)"
    code, out = _run(
        [sys.executable, "-m", "pytest", "tests", "-q", "-k", "cuda", "-p", "no:cacheprovider"],
        timeout=150,
    )
    summary = _last_line(out, r"passed|failed|error|no tests ran")
    passed = re.search(r"(\d+) passed", summary)
    return code == 0 and passed is not None, summary


def check_cartpole(device: torch.device, quick: bool) -> tuple[bool, str]:
    epochs = 3 if quick else 30
    code, out = _run(
        [sys.executable, "-m", "evochi_torch", "train", "examples.cartpole:CartPole",
         "--devices", str(device), "--workers", "1", "--max-epochs", str(epochs)],
        timeout=180,
    )  # fmt: skip
    if code != 0:
        return False, f"exit {code}: {_last_line(out, r'rror|Exception')}"
    return True, _last_line(out, r"^trained ")


def check_population_forward(device: torch.device, quick: bool) -> tuple[bool, str]:
    sizes = ["--members", "32", "--calls", "5", "--rounds", "2"] if quick else ["--rounds", "3"]
    code, out = _run(
        [sys.executable, "-m", "benchmarks.population_forward", "--device", str(device), *sizes],
        timeout=120,
    )
    if code != 0:
        return False, f"exit {code}: {_last_line(out, r'rror|Exception')}"
    return True, _last_line(out, r"obs=\[\d+, \d+\]:")


def check_lowrank(device: torch.device, quick: bool) -> tuple[bool, str]:
    sizes = (
        ["--d-model", "128", "--layers", "2", "--members", "16", "--rounds", "2"]
        if quick
        else ["--d-model", "1024", "--members", "256", "--rounds", "3"]
    )
    code, out = _run(
        [sys.executable, "-m", "benchmarks.lowrank", "forward", "--regime", "token",
         "--device", str(device), *sizes],
        timeout=240,
    )  # fmt: skip
    if code != 0:
        return False, f"exit {code}: {_last_line(out, r'rror|Exception')}"
    return True, _last_line(out, r"^forward ")


def _h2d_bytes(trace: Path) -> tuple[int, int]:
    """(bytes, copies) of host-to-device memcpy events in a torch profiler chrome trace."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    total = copies = 0
    for event in events:
        name = str(event.get("name", ""))
        if "HtoD" in name and "memcpy" in (str(event.get("cat", "")) + name).lower():
            copies += 1
            total += int(event.get("args", {}).get("bytes", 0))
    return total, copies


def device_epoch(
    device: torch.device, num_params: int, members: int, epochs: int = 3
) -> dict[str, float]:
    """Runs `epochs` ES epochs as a worker on `device` would; returns timings and traffic."""
    from evochi_torch import ESConfig
    from evochi_torch.functional import (
        NoiseTable,
        init_optimizer_state,
        member_offsets,
        perturbed_params,
        tell,
    )

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    config = ESConfig(population_size=members, sigma=0.02, learning_rate=0.01, seed=0)
    t0 = time.perf_counter()
    # Generated on the host, like every worker does: the same bits on CPUs and GPUs.
    table = NoiseTable.for_params(config.seed, num_params)
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table.to(device)  # copied once per device, then cached
    sync()
    copy_s = time.perf_counter() - t0
    center = torch.zeros(num_params)
    opt_state = init_optimizer_state(config, num_params)
    everyone = torch.arange(members)

    def epoch(e: int) -> tuple[float, float]:
        nonlocal center, opt_state
        t0 = time.perf_counter()
        offsets, signs = member_offsets(
            config.seed, e, members, num_params, table.size, config.antithetic
        )
        rows = perturbed_params(center, table, offsets, signs, config.sigma, everyone, device)
        # Stands in for the evaluation: one reward per member comes back to the host.
        rewards = rows.square().mean(dim=1).neg().cpu().numpy().astype(np.float64)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        # The update stays on the host: bit-identical in every worker, whatever its device.
        center, opt_state = tell(config, center, opt_state, rewards, e, table)
        return build, time.perf_counter() - t0

    epoch(0)  # warm-up: kernels, allocator
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    builds, updates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        with torch.profiler.profile(activities=activities) as prof:
            for e in range(1, epochs + 1):
                build, update = epoch(e)
                builds.append(build)
                updates.append(update)
            sync()
        prof.export_chrome_trace(str(trace))
        h2d, copies = _h2d_bytes(trace)
    return {
        "generate_s": generate_s,
        "copy_s": copy_s,
        "table_mib": table.size * 4 / MiB,
        "build_ms": float(np.median(builds)) * 1e3,
        "update_ms": float(np.median(updates)) * 1e3,
        "h2d_bytes_per_epoch": h2d / epochs,
        "h2d_copies_per_epoch": copies / epochs,
        # What crosses per epoch by design: the center, plus per member an offset and a scale.
        "expected_bytes_per_epoch": num_params * 4 + members * (8 + 4),
        "host_built_bytes_per_epoch": members * num_params * 4,
    }


def check_es_update(device: torch.device, quick: bool) -> tuple[bool, str]:
    num_params, members = (10_000, 32) if quick else (1_000_000, 256)
    r = device_epoch(device, num_params, members)
    measured = r["h2d_bytes_per_epoch"]
    detail = (
        f"params={num_params} members={members}: noise table {r['table_mib']:.0f} MiB generated "
        f"on the host in {r['generate_s']:.1f}s, copied to {device} once in {r['copy_s']:.2f}s; "
        f"per epoch: members built on the device {r['build_ms']:.1f} ms, update on the host "
        f"{r['update_ms']:.1f} ms; host->device {measured / 1024:.1f} KiB/epoch measured in "
        f"{r['h2d_copies_per_epoch']:.0f} copies (expected "
        f"{r['expected_bytes_per_epoch'] / 1024:.1f} KiB: center + offsets + signs; "
        "building members on the host would copy "
        f"{r['host_built_bytes_per_epoch'] / MiB:.0f} MiB)"
    )
    if device.type != "cuda":
        return True, detail + " [no device copies on the CPU]"
    # The point of building members on the device: per-epoch traffic is O(P), not O(members*P).
    ok = 0 < measured < r["host_built_bytes_per_epoch"] / 10
    if measured == 0:
        detail += " [the profiler reported no memcpy bytes: traffic not measured]"
    return ok, detail


CHECKS: list[tuple[str, Callable[[torch.device, bool], tuple[bool, str]]]] = [
    ("cuda-tests", check_cuda_tests),
    ("cartpole", check_cartpole),
    ("population_forward", check_population_forward),
    ("es_update", check_es_update),
    ("lowrank", check_lowrank),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the CUDA-only tests, a CartPole training and the device benchmarks "
        "on a GPU; one summary line per check. Exits 0 (skipping) where there is no GPU."
    )
    parser.add_argument("--device", default="cuda:0", help="the device to check. Default: cuda:0")
    parser.add_argument("--quick", action="store_true", help="small sizes (for the test suite)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reason = skip_reason(device)
    if reason is not None:
        print(f"gpu-check: skipped: {reason}; nothing was run", flush=True)
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    print(f"gpu-check: {len(CHECKS)} checks on {device} ({name})", flush=True)
    failed = 0
    started = time.perf_counter()
    for check_name, check in CHECKS:
        t0 = time.perf_counter()
        try:
            ok, detail = check(device, args.quick)
        except Exception as exc:  # one broken check must not hide the others' results
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        failed += not ok
        verdict = "ok" if ok else "FAILED"
        print(
            f"gpu-check {check_name}: {verdict} ({time.perf_counter() - t0:.0f}s) {detail}",
            flush=True,
        )
    total = time.perf_counter() - started
    print(
        f"gpu-check: {len(CHECKS) - failed}/{len(CHECKS)} checks ok on {device} in {total:.0f}s",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
