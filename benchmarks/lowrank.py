"""Benchmark: low-rank ES for large models, side by side with its baselines in one run.

forward  A population step (building the members' perturbations + the forward pass) of an
         ``nn.TransformerEncoder`` (6 layers) against plain batched inference of the same
         module on the same inputs, interleaved (median of rounds):
           * wide: ``--seqs`` sequences x ``--tokens`` tokens per member (compute-bound);
           * token: one token per member (memory-bound, like decoding), with the traffic
             bound beside it: a low-rank step reads the weights plus every member's factors,
             so at best it runs at weights / (weights + factors) of inference's speed.
peak     Peak RSS of the same two, each once in its own process.
update   The low-rank update (:meth:`LowRankNoise.weighted_sum`) against the full-rank one
         (:func:`noise_weighted_sum`) at 1M, 19M and 100M parameters, time and peak memory
         (each in its own process).
quality  Low-rank against full-rank OpenAI-ES on the digits task (8x8 images, MLP) at the same
         number of evaluations, for several ranks.

    python -m benchmarks.lowrank forward --d-model 512 --members 256 --regime wide
    python -m benchmarks.lowrank forward --d-model 2048 --members 256 --regime token
    python -m benchmarks.lowrank peak --d-model 512 --members 256 --regime wide
    python -m benchmarks.lowrank update
    python -m benchmarks.lowrank quality
    python -m benchmarks.lowrank all --quick      # small sizes, a minute
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from evochi_torch import ESConfig, PopulationPolicy, get_strategy
from evochi_torch.lowrank import LowRankLayout, LowRankNoise, noise_for
from evochi_torch.lowrank_policy import LowRankPolicy
from evochi_torch.noise import NoiseTable, member_offsets, perturbed_params
from evochi_torch.state import initial_state


def transformer(d_model: int, layers: int = 6) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        d_model, max(1, d_model // 64), 4 * d_model, dropout=0.0, batch_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _sides(
    args: argparse.Namespace, check: bool = True
) -> tuple[Callable[[], object], Callable[[], object], int, LowRankLayout]:
    """The forward benchmark's (plain inference, low-rank population step), the parameter
    count and the low-rank layout. `check`: first compare the two on a few members."""
    device = torch.device(args.device)
    module = transformer(args.d_model, args.layers).to(device)
    params = sum(p.numel() for p in module.parameters())
    members = args.members
    layout = LowRankLayout.for_module(module, args.rank)
    noise = LowRankNoise(NoiseTable.for_params(0, layout.dim), layout)
    offsets, signs = member_offsets(0, 1, members, layout.dim, noise.size)
    center = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    everyone = torch.arange(members)
    if args.regime == "wide":
        x = torch.randn(members, args.seqs, args.tokens, args.d_model, device=device)
    else:
        x = torch.randn(members, 1, 1, args.d_model, device=device)
    flat = x.reshape(-1, *x.shape[2:])

    def plain() -> object:
        with torch.no_grad():
            return module(flat)

    def lowrank() -> object:
        policy = LowRankPolicy(module, center, noise, offsets, signs, 0.01, everyone)
        return policy(x)

    if check:  # members at sigma -> 0 are the center
        few = torch.arange(min(4, members))
        tiny = LowRankPolicy(module, center, noise, offsets, signs, 1e-9, few)(x[few])
        torch.testing.assert_close(tiny.reshape(-1, *tiny.shape[-2:]),
                                   plain().reshape(members, -1, *tiny.shape[-2:])[few].reshape(
                                       -1, *tiny.shape[-2:]), rtol=1e-3, atol=1e-3)  # fmt: skip
    return plain, lowrank, params, layout


def forward(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    plain, lowrank, params, layout = _sides(args)
    members = args.members
    plain(), lowrank()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "lowrank": []}
    for _ in range(args.rounds):
        times["plain"].append(_timed(plain, sync))
        times["lowrank"].append(_timed(lowrank, sync))
    t_plain = statistics.median(times["plain"])
    t_low = statistics.median(times["lowrank"])
    weights = sum(s.numel for s in layout.lowrank)
    factors = members * sum(
        (2 if args.rank == 1 else args.rank) * (s.rows + s.cols) for s in layout.lowrank
    )
    row = {
        "regime": args.regime,
        "d_model": args.d_model,
        "params": params,
        "members": members,
        "rank": args.rank,
        "plain_s": t_plain,
        "lowrank_s": t_low,
        "ratio": t_plain / t_low,
        "traffic_bound": weights / (weights + factors),
    }
    print(
        f"forward {args.regime:5s} d_model={args.d_model} params={params / 1e6:.1f}M "
        f"members={members} rank={args.rank}: plain {t_plain * 1e3:.1f} ms, low-rank step "
        f"{t_low * 1e3:.1f} ms -> {row['ratio']:.2f}x of inference"
        + (f" (traffic bound {row['traffic_bound']:.2f}x)" if args.regime == "token" else ""),
        flush=True,
    )
    return row


def side_peak(args: argparse.Namespace) -> None:
    """One side of the forward benchmark, once, in this process: prints its peak RSS."""
    plain, lowrank, _, _ = _sides(args, check=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (plain if args.side == "plain" else lowrank)()
    top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_mib": before / 1024, "peak_mib": top / 1024}))


def peak_memory(args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS of plain inference and of the low-rank step, each in its own process."""
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}"
             for k in ("d_model", "layers", "members", "rank", "regime", "seqs", "tokens",
                       "device", "threads")]  # fmt: skip
    result = {}
    for side in ("plain", "lowrank"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.lowrank", "side", "--side", side, *flags],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result[side] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, low = result["plain"], result["lowrank"]
    print(
        f"peak {args.regime:5s} d_model={args.d_model} members={args.members} rank={args.rank}: "
        f"plain inference {plain['peak_mib']:.0f} MiB (model and inputs {plain['before_mib']:.0f}"
        f"), low-rank step {low['peak_mib']:.0f} MiB (model, inputs, noise "
        f"{low['before_mib']:.0f}) -> {low['peak_mib'] / plain['peak_mib']:.2f}x",
        flush=True,
    )
    return {"plain_mib": plain["peak_mib"], "lowrank_mib": low["peak_mib"]}


_UPDATE = """
import json, resource, sys, time, numpy as np, torch
from evochi_torch.lowrank import LowRankLayout, LowRankNoise
from evochi_torch.noise import NoiseTable, member_offsets, noise_weighted_sum
mode, d, layers, members, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
shapes = [(d, d), (d,)] * layers
layout = LowRankLayout(shapes, rank)
p = layout.num_params
dim = layout.dim if mode == "lowrank" else p
table = NoiseTable.for_params(0, dim)
noise = LowRankNoise(table, layout) if mode == "lowrank" else table
offsets, signs = member_offsets(0, 1, members, dim, table.size)
weights = np.random.default_rng(0).normal(size=members)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode == "lowrank":
    out = noise.weighted_sum(offsets, signs, weights, p, scale=0.01)
else:
    out = noise_weighted_sum(table, offsets, signs, weights, p, scale=0.01)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"params": p, "seconds": seconds, "extra_mib": (peak - before) / 1024,
                  "peak_mib": peak / 1024}))
"""


def update(args: argparse.Namespace) -> list[dict[str, float]]:
    sizes = [(1024, 1), (1024, 18), (4096, 6)]  # ~1M, ~19M, ~100M parameters
    if args.quick:
        sizes = [(512, 4), (1024, 4)]
    rows = []
    for d, layers in sizes:
        result = {}
        for mode in ("full", "lowrank"):
            out = subprocess.run(
                [sys.executable, "-c", _UPDATE, mode, str(d), str(layers), str(args.members),
                 str(args.rank)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result[mode] = json.loads(out.stdout)
        full, low = result["full"], result["lowrank"]
        print(
            f"update params={full['params'] / 1e6:.1f}M members={args.members} "
            f"rank={args.rank}: full-rank {full['seconds']:.3f} s (peak RSS "
            f"{full['peak_mib']:.0f} MiB), low-rank {low['seconds']:.3f} s (peak RSS "
            f"{low['peak_mib']:.0f} MiB) -> {full['seconds'] / low['seconds']:.1f}x faster",
            flush=True,
        )
        rows.append({"params": full["params"], "full": full, "lowrank": low})
    return rows


def quality(args: argparse.Namespace) -> list[dict[str, float]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))

    def accuracy(params: torch.Tensor, idx: torch.Tensor) -> float:
        module = make()
        torch.nn.utils.vector_to_parameters(params, module.parameters())
        with torch.no_grad():
            return (module(x[idx]).argmax(-1) == y[idx]).float().mean().item()

    epochs = 40 if args.quick else 150
    population = 64
    ranks: list[int | None] = [None, 1, 4, 16]
    rows = []
    for rank in ranks:
        config = ESConfig(population_size=population, sigma=0.05, learning_rate=0.03, seed=1)
        if rank:
            config = config.replace(perturbation="lowrank", rank=rank)
        module = make()
        shapes = [tuple(p.shape) for p in module.parameters()]
        noise = noise_for(config, shapes)
        state = initial_state(module, config, noise)
        strategy = get_strategy(config.strategy)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            offsets, signs, sigma = strategy.ask(config, state.opt_state, state.epoch,
                                                 state.params.numel(), noise)  # fmt: skip
            members = torch.arange(population)
            batch = train[
                torch.randint(0, len(train), (256,), generator=torch.Generator().manual_seed(epoch))
            ]
            if rank:
                policy = LowRankPolicy(make().eval(), state.params, noise, offsets, signs,
                                       sigma, members)  # fmt: skip
            else:
                policy = PopulationPolicy(
                    make(), perturbed_params(state.params, noise, offsets, signs, sigma, members)
                )
            logits = policy(x[batch].expand(population, -1, -1))
            rewards = (
                -nn.functional.cross_entropy(
                    logits.reshape(-1, 10), y[batch].repeat(population), reduction="none"
                )
                .view(population, -1)
                .mean(-1)
            )
            state = state.advance(rewards.numpy().astype(np.float64), noise)
        seconds = time.perf_counter() - t0
        acc = accuracy(state.params, test)
        label = "full-rank" if rank is None else f"rank {rank}"
        print(
            f"quality digits MLP 64-128-10, population {population}, {epochs} epochs "
            f"({epochs * population} evaluations): {label:9s} test accuracy {acc:.3f} "
            f"({seconds:.1f} s)",
            flush=True,
        )
        rows.append({"rank": rank or 0, "accuracy": acc, "seconds": seconds})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Low-rank ES benchmarks (see the module docstring for what each measures)."
    )
    parser.add_argument("what", choices=["forward", "peak", "update", "quality", "all", "side"])
    parser.add_argument("--side", choices=["plain", "lowrank"], help=argparse.SUPPRESS)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--members", type=int, default=256)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--regime", choices=["wide", "token"], default="token")
    parser.add_argument("--seqs", type=int, default=16, help="sequences per member (wide)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per sequence (wide)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "side":
        side_peak(args)
        return
    if args.what == "peak":
        peak_memory(args)
        return
    if args.what in ("forward", "all"):
        if args.what == "all":
            for regime, d, members in (
                (("wide", 128, 16), ("token", 256, 64))
                if args.quick
                else (("wide", 512, 256), ("token", 512, 256), ("token", 2048, 256))
            ):
                args.regime, args.d_model, args.members = regime, d, members
                if args.quick:
                    args.seqs, args.tokens = 4, 16
                forward(args)
        else:
            forward(args)
    if args.what in ("update", "all"):
        update(args)
    if args.what in ("quality", "all"):
        quality(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
