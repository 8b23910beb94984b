"""Benchmark: one ES optimize step (noise regeneration + gradient + update), evochi vs dense.

Dense baseline (the es-torch approach)::

    h = randn(npop / 2, P); noise = cat([h, -h]); g = einsum("np,n->p", noise, w) / (npop * sigma)

evochi: ``es_step`` (fitness shaping, streamed weighted sum over shared-noise-table windows,
Adam update). Also timed, as the measured design alternative to the table: one seeded
generator per antithetic pair, streamed (``--no-per-member`` skips it). All apply the same
Adam update. Step times are measured side by side in this process (interleaved repeats,
median); peak memory of each is measured in its own subprocess as
``ru_maxrss`` after the work minus ``ru_maxrss`` before it. The noise table is generated once
per worker process: its time is reported separately and excluded from the step time, but its
memory *is* counted in evochi's peak.

    python -m benchmarks.es_update [--shapes 1000x1000000,200x5000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from evochi_torch import ESConfig
from evochi_torch.functional import (
    NoiseTable,
    apply_update,
    es_step,
    init_optimizer_state,
    shape_fitness,
)
from evochi_torch.noise import default_table_size

DEFAULT_SHAPES = "1000x1000000,200x5000000"
OURS_PER_ROUND = 5


def _config(npop: int) -> ESConfig:
    return ESConfig(population_size=npop, sigma=0.02, learning_rate=0.01, seed=0)


def _rewards(npop: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(epoch).normal(size=npop)


def dense_step(params, opt_state, rewards, epoch, config, gen):
    """The dense baseline: materialise the whole population's noise."""
    npop, p = config.population_size, params.numel()
    w = torch.from_numpy(shape_fitness(rewards, config.shaping)).float()
    h = torch.randn(npop // 2, p, generator=gen)
    noise = torch.cat([h, -h])
    del h
    grad = torch.einsum("np,n->p", noise, w) / (npop * config.sigma)
    del noise
    return apply_update(params, grad, opt_state, config)


def per_member_step(params, opt_state, rewards, epoch, config):
    """The design alternative to a noise table: seed a generator per antithetic pair and stream."""
    npop, p = config.population_size, params.numel()
    w = shape_fitness(rewards, config.shaping)
    acc = torch.zeros(p)
    eps = torch.empty(p)
    gen = torch.Generator()
    for k in range(npop // 2):
        gen.manual_seed((config.seed * 1_000_003 + epoch) * 1_000_003 + k)
        torch.randn(p, generator=gen, out=eps)
        acc.add_(eps.mul_(float(w[2 * k] - w[2 * k + 1]) / (npop * config.sigma)))
    return apply_update(params, acc, opt_state, config)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(kind: str, npop: int, p: int) -> None:
    """Run one step of ``kind`` and print its peak memory increase as JSON."""
    config = _config(npop)
    params = torch.zeros(p)
    opt_state = init_optimizer_state(config, p)
    rewards = _rewards(npop, 0)
    gen = torch.Generator().manual_seed(0)
    gc.collect()
    base = _maxrss_mib()
    if kind == "dense":
        dense_step(params, opt_state, rewards, 0, config, gen)
    else:
        table = NoiseTable.for_params(config.seed, p)
        es_step(params, opt_state, rewards, 0, table, config)
    print(json.dumps({"peak_mib": _maxrss_mib() - base}))


def _peak_in_subprocess(kind: str, npop: int, p: int) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.es_update", "--child", kind, str(npop), str(p)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def measure_memory(npop: int, p: int) -> tuple[float, float]:
    """Peak MiB of (dense, evochi), each in a fresh subprocess.

    Call before this process does heavy work: Linux children inherit the parent's ru_maxrss
    across fork/exec, which would hide the child's own peak.
    """
    return _peak_in_subprocess("dense", npop, p), _peak_in_subprocess("evochi", npop, p)


def bench_shape(
    npop: int, p: int, repeats: int, dense_mib: float, ours_mib: float, per_member: bool
) -> None:
    config = _config(npop)
    t0 = time.perf_counter()
    table = NoiseTable.for_params(config.seed, p)
    table_s = time.perf_counter() - t0
    params = torch.zeros(p)
    opt_state = init_optimizer_state(config, p)
    gen = torch.Generator().manual_seed(0)
    # Warm-up (first-touch page faults, allocator) for both, then interleave timed repeats.
    es_step(params, opt_state, _rewards(npop, 0), 0, table, config)
    dense_times, ours_times, seeded_times = [], [], []
    for epoch in range(1, repeats + 1):
        rewards = _rewards(npop, epoch)
        t0 = time.perf_counter()
        dense_step(params, opt_state, rewards, epoch, config, gen)
        dense_times.append(time.perf_counter() - t0)
        gc.collect()
        if per_member:
            t0 = time.perf_counter()
            per_member_step(params, opt_state, rewards, epoch, config)
            seeded_times.append(time.perf_counter() - t0)
        # Ours is cheap: time it several times per round so one noisy sample on this shared
        # machine does not decide the median.
        for _ in range(OURS_PER_ROUND):
            t0 = time.perf_counter()
            es_step(params, opt_state, rewards, epoch, table, config)
            ours_times.append(time.perf_counter() - t0)
    dense_s = statistics.median(dense_times)
    ours_s = statistics.median(ours_times)
    table_mib = default_table_size(p) * 4 / 2**20
    print(
        f"es_update npop={npop} params={p}: dense {dense_s:.3f} s/step, peak +{dense_mib:.0f} MiB"
        f" | evochi {ours_s:.3f} s/step, peak +{ours_mib:.0f} MiB (incl. the"
        f" {table_mib:.0f} MiB noise table) | table generated once per worker in {table_s:.2f} s,"
        f" not in the step time | torch threads={torch.get_num_threads()}; medians of"
        f" {len(dense_times)}/{len(ours_times)} runs (min {min(dense_times):.3f} /"
        f" {min(ours_times):.3f} s)",
        flush=True,
    )
    if seeded_times:
        seeded_s = statistics.median(seeded_times)
        print(
            f"es_update npop={npop} params={p}: design alternative, per-pair seeded generator "
            f"streamed (no table): {seeded_s:.3f} s/step = {seeded_s / ours_s:.1f}x the table's",
            flush=True,
        )
    # ru_maxrss is a high-water mark: tiny shapes stay below the import-time peak (ratio n/a).
    ratio = f"{ours_mib / dense_mib:.3f}" if dense_mib >= 1 else "n/a"
    print(
        f"es_update npop={npop} params={p} speedup={dense_s / ours_s:.1f} peak_mem_ratio={ratio}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NPOPxPARAMS,... list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-per-member",
        action="store_true",
        help="skip timing the per-member seeded alternative to the noise table",
    )
    parser.add_argument("--child", nargs=3, metavar=("KIND", "NPOP", "PARAMS"), help="internal")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind, npop, p = args.child
        child(kind, int(npop), int(p))
        return
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    memory = {shape: measure_memory(*shape) for shape in shapes}
    for npop, p in shapes:
        bench_shape(npop, p, args.repeats, *memory[(npop, p)], not args.no_per_member)


if __name__ == "__main__":
    main()
