"""Benchmark: batched forward of many population members, bmm fast path vs vmap.

256 members of a 17-64-64-6 tanh MLP (a MuJoCo-sized policy), observations ``[256, 17]`` (one
environment per member) and ``[256, 8, 17]`` (eight). Baseline: ``torch.func.functional_call``
+ ``vmap`` over the unflattened parameters (``PopulationPolicy(..., mode="vmap")``, the generic
path). Both are timed side by side in this process (interleaved blocks, median per call).
Building the fast path's stacked weights happens once per batch of members (then reused for
every environment step); it is reported separately.

    python -m benchmarks.population_forward [--members 256] [--calls 200] [--rounds 7]
        [--device cuda:0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from evochi_torch import PopulationPolicy
from evochi_torch.functional import flatten_params, num_params


def make_policy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(17, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 6)
    )


def per_call(
    fn: Callable[[], object], calls: int, sync: Callable[[], None] = lambda: None
) -> float:
    # CUDA kernels run asynchronously: `sync` waits for them, else only launches are timed.
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--members", type=int, default=256)
    parser.add_argument("--calls", type=int, default=200, help="forward calls per timed block")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed blocks")
    parser.add_argument("--device", default="cpu", help="where members run (e.g. cuda:0)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if args.threads:
        torch.set_num_threads(args.threads)

    module = make_policy().to(device)
    b = args.members
    gen = torch.Generator().manual_seed(1)
    params = flatten_params(module).cpu() + 0.02 * torch.randn(b, num_params(module), generator=gen)
    params = params.to(device)
    t0 = time.perf_counter()
    fast = PopulationPolicy(module, params)
    fast(torch.zeros(b, 17, device=device))  # builds the stacked-weight plan
    sync()
    build_ms = (time.perf_counter() - t0) * 1e3
    assert fast.mode == "bmm"
    vmapped = PopulationPolicy(module, params, mode="vmap")

    speedups = {}
    for shape in ((b, 17), (b, 8, 17)):
        x = torch.randn(*shape, generator=gen).to(device)
        torch.testing.assert_close(fast(x), vmapped(x), rtol=1e-4, atol=1e-5)
        for _ in range(10):  # warm-up
            fast(x)
            vmapped(x)
        fast_t, vmap_t = [], []
        for _ in range(args.rounds):
            fast_t.append(per_call(lambda x=x: fast(x), args.calls, sync))
            vmap_t.append(per_call(lambda x=x: vmapped(x), args.calls, sync))
        f, v = statistics.median(fast_t), statistics.median(vmap_t)
        speedups[shape] = v / f
        print(
            f"population_forward members={b} obs={list(shape)}: bmm {f * 1e3:.3f} ms/call, "
            f"vmap {v * 1e3:.3f} ms/call, speedup={v / f:.2f} "
            f"(device={device}, threads={torch.get_num_threads()}, "
            f"median of {args.rounds}x{args.calls} calls)",
            flush=True,
        )
    print(
        f"population_forward fast-path setup (stacked weights, once per batch of members): "
        f"{build_ms:.2f} ms",
        flush=True,
    )
    print(f"population_forward members={b} speedup={speedups[(b, 17)]:.2f}", flush=True)


if __name__ == "__main__":
    main()
