"""Low-rank perturbations: the layout, the shared-weight forward pass against explicit perturbed
weights, the exact update against its explicit sum, batch invariance, CPU independence and the
memory a population costs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from evochi_torch import ESConfig
from evochi_torch.lowrank import LowRankLayout, LowRankNoise, noise_for
from evochi_torch.lowrank_policy import LowRankPolicy
from evochi_torch.noise import NoiseTable, member_offsets
from evochi_torch.population import PopulationPolicy, flatten_params, load_flat
from evochi_torch.strategies import get_strategy


class TinyTransformer(nn.Module):
    """Embedding, position embeddings looked up with an ``arange`` made inside the forward
    (shared by every member under vmap), a learned positional table (used by ``add``: the
    materialised fallback), two encoder layers (MultiheadAttention, LayerNorm, MLP) and a
    linear head."""

    def __init__(self, vocab: int = 11, d: int = 32, length: int = 7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.where = nn.Embedding(length, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        where = self.where(torch.arange(idx.shape[-1], device=idx.device))
        return self.head(self.enc(self.emb(idx) + where + self.pos))


class CrossAttention(nn.Module):
    """Separate query/key/value inputs, a causal mask and a key padding mask."""

    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 3, batch_first=True)
        self.kv = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.kv(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[-2])
        pad = torch.zeros(x.shape[0], x.shape[-2], dtype=torch.bool)
        pad[:, -1] = True
        out, _ = self.attn(x, kv, kv, attn_mask=mask, key_padding_mask=pad, need_weights=False)
        return out


def _setup(module: nn.Module, rank: int, population: int = 8, epoch: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    layout = LowRankLayout.for_module(module, rank)
    noise = LowRankNoise(NoiseTable.for_params(seed, layout.dim), layout)
    offsets, signs = member_offsets(seed, epoch, population, layout.dim, noise.size)
    return noise, offsets, signs, flatten_params(module)


def test_layout_factors_the_matrices_that_gain_and_keeps_the_rest_dense():
    layout = LowRankLayout([(64, 32), (64,), (3, 3), (8, 4, 3, 3), (1000, 16)], rank=2)
    assert [s.index for s in layout.lowrank] == [0, 4]  # (3, 3): 2 * 6 >= 9, no gain
    assert [s.index for s in layout.dense] == [1, 2, 3]
    assert layout.dense_size == 64 + 9 + 288
    assert layout.dim == layout.dense_size + 2 * (64 + 32) + 2 * (1000 + 16)
    assert layout.num_params == 64 * 32 + 64 + 9 + 288 + 16000
    with pytest.raises(ValueError, match="rank"):
        LowRankLayout([(4, 4)], rank=0)


# 3 x 7 rows per member add the low-rank terms column by column, 10 x 7 (> 64) by a product.
@pytest.mark.parametrize("seqs", [3, 10])
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("make", [TinyTransformer, CrossAttention])
def test_forward_equals_explicit_perturbed_weights(make, rank, seqs):
    torch.manual_seed(1)
    module = make().eval()
    noise, offsets, signs, center = _setup(module, rank)
    members = torch.arange(8)
    x = torch.randint(0, 11, (8, seqs, 7)) if make is TinyTransformer else torch.randn(8, 2, 5, 24)
    got = LowRankPolicy(module, center, noise, offsets, signs, 0.05, members)(x)
    explicit = noise.materialize(center, offsets, signs, 0.05, members)
    want = PopulationPolicy(module, explicit, mode="vmap")(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    # Every member differs from the center: the perturbation reached each output.
    plain = module(x[0])
    assert all(not torch.allclose(got[b], plain, atol=1e-4) for b in range(1, 8))


def test_explicit_members_are_center_plus_sigma_times_the_rank_r_product():
    module = nn.Linear(10, 6)
    noise, offsets, signs, center = _setup(module, rank=2)
    rows = noise.materialize(center, offsets, signs, 0.1, torch.tensor([2, 3]))
    (seg,) = noise.layout.lowrank
    win = noise.windows(offsets, torch.tensor([2]))
    a, b = noise.layout.factors(win, seg)
    delta = (rows[0] - center)[:60].view(6, 10)
    torch.testing.assert_close(delta, 0.1 * a[0] @ b[0].T / math.sqrt(2))
    assert torch.linalg.matrix_rank(delta.double(), atol=1e-5) == 2  # up to float32 rounding
    # Antithetic partner: the same window with the opposite sign.
    torch.testing.assert_close(rows[1] - center, -(rows[0] - center))
    # Factors are on the 1/32 grid.
    assert torch.equal(a * 32, torch.round(a * 32))


@pytest.mark.parametrize("seqs", [3, 10])
@pytest.mark.parametrize("rank", [1, 3])
def test_a_members_output_does_not_depend_on_how_the_population_is_split(rank, seqs):
    torch.manual_seed(2)
    module = TinyTransformer().eval()
    noise, offsets, signs, center = _setup(module, rank, population=12)
    x = torch.randint(0, 11, (12, seqs, 7))
    everyone = LowRankPolicy(module, center, noise, offsets, signs, 0.05, torch.arange(12))(x)
    for part in (torch.tensor([5]), torch.arange(3, 10), torch.tensor([11, 0, 7])):
        alone = LowRankPolicy(module, center, noise, offsets, signs, 0.05, part)(x[part])
        assert torch.equal(alone, everyone[part])
    for per_call in (1, 5):
        split = LowRankPolicy(
            module, center, noise, offsets, signs, 0.05, torch.arange(12), members_per_call=per_call
        )
        assert torch.equal(split(x), everyone)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"features": h, "logits": self.head(h)}


def test_wide_inputs_run_in_calls_of_a_few_members_with_the_same_result():
    # 1100 rows per member: the automatic split runs the 5 members one per call.
    module = TwoHeads()
    noise, offsets, signs, center = _setup(module, rank=2, population=6)
    members = torch.tensor([4, 0, 3, 1, 5])
    x = torch.randn(5, 2, 550, 24)
    policy = LowRankPolicy(module, center, noise, offsets, signs, 0.05, members)
    assert policy._members_per_call([x]) == 1
    auto = policy(x)
    whole = LowRankPolicy(module, center, noise, offsets, signs, 0.05, members, members_per_call=5)(
        x
    )
    for key in ("features", "logits"):
        assert auto[key].shape == (5, 2, 550, 16 if key == "features" else 3)
        assert torch.equal(auto[key], whole[key])
    rows = noise.materialize(center, offsets, signs, 0.05, members)
    for b in range(5):
        load_flat(module, rows[b])
        with torch.no_grad():
            torch.testing.assert_close(auto["logits"][b], module(x[b])["logits"])
    with pytest.raises(ValueError, match="members_per_call"):
        LowRankPolicy(module, center, noise, offsets, signs, 0.05, members, members_per_call=0)


def _explicit_sum(noise, offsets, signs, weights, scale):
    p = noise.layout.num_params
    zero = torch.zeros(p)
    rows = noise.materialize(zero, offsets, signs, 1.0, torch.arange(len(weights)))
    return (torch.from_numpy(weights)[:, None] * rows.double()).sum(0) * scale


@pytest.mark.parametrize("rank", [1, 4])
def test_update_equals_the_explicit_sum_of_member_directions(rank):
    module = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    noise, offsets, signs, _ = _setup(module, rank, population=16)
    weights = np.random.default_rng(0).normal(size=16)
    got = noise.weighted_sum(offsets, signs, weights, noise.layout.num_params, scale=0.3)
    want = _explicit_sum(noise, offsets, signs, weights, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for seg in noise.layout.lowrank:  # a sum of 8 pairs of rank-r terms
        block = got[seg.offset : seg.offset + seg.numel].view(seg.shape).double()
        assert torch.linalg.matrix_rank(block, atol=1e-4) == min(8 * rank, *seg.shape)


def test_openai_es_tell_uses_low_rank_directions():
    module = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    config = ESConfig(population_size=10, perturbation="lowrank", rank=2, sigma=0.1)
    params = flatten_params(module)
    noise = noise_for(config, [tuple(p.shape) for p in module.parameters()])
    assert isinstance(noise, LowRankNoise)
    strategy = get_strategy("openai_es")
    state = strategy.init(config, params)
    offsets, signs, _ = strategy.ask(config, state, 0, params.numel(), noise)
    assert offsets.max() <= noise.size - noise.layout.dim
    rewards = np.linspace(-1, 1, 10)
    config_sgd = config.replace(optimizer="sgd", momentum=0.0, learning_rate=1.0)
    new, _ = strategy.tell(config_sgd, params, strategy.init(config_sgd, params), rewards, 0,
                           noise)  # fmt: skip
    weights = strategy.shaped(rewards, config)
    want = _explicit_sum(noise, offsets, signs, weights, 1 / (10 * 0.1))
    torch.testing.assert_close((new - params).double(), want, rtol=1e-5, atol=1e-6)


def test_strategies_that_adapt_per_parameter_sigma_refuse_low_rank():
    for name in ("snes", "pgpe", "sep_cma", "cem"):
        with pytest.raises(ValueError, match="openai_es") as info:
            ESConfig(population_size=8, strategy=name, perturbation="lowrank")
        assert "ars" in str(info.value)
    with pytest.raises(ValueError, match="perturbation"):
        ESConfig(population_size=8, perturbation="sparse")
    with pytest.raises(ValueError, match="rank"):
        ESConfig(population_size=8, perturbation="lowrank", rank=0)


def test_the_fingerprint_names_rank_and_structure():
    a = noise_for(ESConfig(population_size=4, perturbation="lowrank"), [(8, 6), (8,)])
    b = noise_for(ESConfig(population_size=4, perturbation="lowrank"), [(6, 8), (8,)])
    c = noise_for(ESConfig(population_size=4, perturbation="lowrank", rank=2), [(8, 6), (8,)])
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    full = noise_for(ESConfig(population_size=4), [(8, 6), (8,)])
    assert isinstance(full, NoiseTable) and "lowrank" not in full.fingerprint


_DIGEST = textwrap.dedent(
    """
    import hashlib, numpy as np, torch
    from torch import nn
    from evochi_torch.lowrank import LowRankLayout, LowRankNoise
    from evochi_torch.noise import NoiseTable, member_offsets
    layout = LowRankLayout([(300, 200), (200,), (64, 300), (64,)], rank=3)
    noise = LowRankNoise(NoiseTable.for_params(5, layout.dim), layout)
    offsets, signs = member_offsets(5, 7, 64, layout.dim, noise.size)
    weights = np.random.default_rng(1).normal(size=64) / 7.0
    update = noise.weighted_sum(offsets, signs, weights, layout.num_params, scale=0.37)
    windows = noise.windows(offsets, torch.arange(64))
    h = hashlib.sha256(update.numpy().tobytes() + windows.numpy().tobytes())
    print(h.hexdigest())
    """
)

_SWITCHES = [
    {},
    {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"},
    {
        "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL "
        "AVX512_ICL AVX512_SPR",
        "OMP_NUM_THREADS": "1",
    },
    {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
]


def test_update_and_factors_have_the_same_bits_under_every_cpu_switch():
    """The update's matrix products run on whatever kernels the BLAS picks for this CPU and
    thread count; exact integer-valued operands make that irrelevant."""
    digests = set()
    for switches in _SWITCHES:
        env = {**os.environ, **switches}
        out = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True,
                             text=True, timeout=120, check=True)  # fmt: skip
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests


def test_update_matches_float64_sums_in_any_order_to_float32_precision():
    layout = LowRankLayout([(256, 256)], rank=2)
    noise = LowRankNoise(NoiseTable.for_params(9, layout.dim), layout)
    offsets, signs = member_offsets(9, 0, 200, layout.dim, noise.size)
    weights = np.random.default_rng(3).normal(size=200)
    got = noise.weighted_sum(offsets, signs, weights, layout.num_params)
    rows = noise.materialize(torch.zeros(layout.num_params), offsets, signs, 1.0,
                             torch.arange(200)).double()  # fmt: skip
    w = torch.from_numpy(weights)
    forward = (w[:, None] * rows).sum(0)
    backward = (w.flip(0)[:, None] * rows.flip(0)).sum(0)
    # The coefficients sit on a grid of 2**-24 of the largest one: errors of that order.
    torch.testing.assert_close(got.double(), forward, rtol=3e-7, atol=1e-5)
    torch.testing.assert_close(got.double(), backward, rtol=3e-7, atol=1e-5)


_MEMORY = textwrap.dedent(
    """
    import resource, torch
    from torch import nn
    from evochi_torch.lowrank import LowRankLayout, LowRankNoise
    from evochi_torch.lowrank_policy import LowRankPolicy
    from evochi_torch.noise import NoiseTable, member_offsets
    torch.set_num_threads(2)
    module = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(6)]).eval()
    center = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    members = 24
    layout = LowRankLayout.for_module(module, 4)
    noise = LowRankNoise(NoiseTable.for_params(0, layout.dim), layout)
    offsets, signs = member_offsets(0, 1, members, layout.dim, noise.size)
    policy = LowRankPolicy(module, center, noise, offsets, signs, 0.01, torch.arange(members))
    out = policy(torch.randn(members, 2, 4096))
    assert out.shape == (members, 2, 4096) and torch.isfinite(out).all()
    full_rank_gib = members * center.numel() * 4 / 2**30
    print(full_rank_gib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    """
)


def test_a_population_that_would_need_8_gib_runs_in_under_2_gib():
    out = subprocess.run([sys.executable, "-c", _MEMORY], capture_output=True, text=True,
                         timeout=280, check=True)  # fmt: skip
    full_rank_gib, peak_gib = map(float, out.stdout.split())
    assert full_rank_gib > 8.0
    assert peak_gib < 2.0, f"peak RSS {peak_gib:.2f} GiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lowrank_forward_on_cuda_equals_the_cpu():
    torch.manual_seed(4)
    module = TinyTransformer().eval()
    noise, offsets, signs, center = _setup(module, rank=2)
    members = torch.arange(8)
    x = torch.randint(0, 11, (8, 3, 7))
    cpu = LowRankPolicy(module, center, noise, offsets, signs, 0.05, members)(x)
    gpu_module = TinyTransformer().eval().to("cuda")
    gpu = LowRankPolicy(gpu_module, center.to("cuda"), noise, offsets, signs, 0.05, members)(x)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


def test_split_coefficients_give_the_bits_of_whole_ones(monkeypatch):
    """Where whole coefficients could overflow 2**53 the product runs on two 12-bit halves;
    both ways are exact, so they agree bit for bit (forced here by lowering the bound)."""
    from evochi_torch import lowrank

    layout = LowRankLayout([(64, 48), (48,)], rank=3)
    noise = LowRankNoise(NoiseTable.for_params(2, layout.dim), layout)
    offsets, signs = member_offsets(2, 1, 32, layout.dim, noise.size)
    weights = np.random.default_rng(5).normal(size=32)
    whole = noise.weighted_sum(offsets, signs, weights, layout.num_params, scale=0.2)
    windows = noise.windows(offsets, torch.arange(32))
    a, b = layout.factors(windows, layout.lowrank[0])
    terms = 16 * 3 * (a.abs().max() * 32).item() * (b.abs().max() * 32).item()
    monkeypatch.setattr(lowrank, "_EXACT", terms * 2**13)  # above the halves, below whole ones
    split = noise.weighted_sum(offsets, signs, weights, layout.num_params, scale=0.2)
    assert torch.equal(whole, split)
    monkeypatch.setattr(lowrank, "_EXACT", terms)  # not even the halves: refused
    with pytest.raises(ValueError, match="too large to be exact"):
        noise.weighted_sum(offsets, signs, weights, layout.num_params, scale=0.2)
