import copy

import pytest
import torch
from torch import nn

from evochi_torch import ESConfig, PopulationPolicy
from evochi_torch.functional import (
    NoiseTable,
    flatten_params,
    load_flat,
    member_offsets,
    num_params,
    perturbed_params,
    unflatten_params,
)
from evochi_torch.population import is_plain_mlp, param_layout


def mlp(bias: bool = True, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8, bias=bias), act(), nn.Sequential(nn.Linear(8, 8), act()), nn.Linear(8, 3)
    )


class Residual(nn.Module):
    """Not an MLP: LayerNorm, a custom forward and a constant buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(self.norm(h) + h) * self.scale


def population(module: nn.Module, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return flatten_params(module) + 0.3 * torch.randn(b, num_params(module), generator=g)


def loop_reference(module: nn.Module, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    clone = copy.deepcopy(module)
    outs = []
    with torch.no_grad():
        for b in range(params.shape[0]):
            outs.append(load_flat(clone, params[b])(x[b]))
    return torch.stack(outs)


def test_flatten_layout_and_round_trip():
    m = mlp()
    flat = flatten_params(m)
    layout = param_layout(m)
    assert [s.name for s in layout] == [n for n, _ in m.named_parameters()]
    assert flat.dtype == torch.float32 and flat.shape == (num_params(m),)
    assert torch.equal(flat[: 8 * 5], m[0].weight.detach().reshape(-1))
    views = unflatten_params(m, flat)
    for name, p in m.named_parameters():
        assert torch.equal(views[name], p.detach())
    other = mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    load_flat(other, flat)
    assert torch.equal(flatten_params(other), flat)
    batched = unflatten_params(m, torch.stack([flat, flat]))
    assert batched["0.weight"].shape == (2, 8, 5)
    with pytest.raises(ValueError, match="P="):
        unflatten_params(m, flat[:-1])


def test_fast_path_detection():
    assert is_plain_mlp(mlp())
    assert is_plain_mlp(mlp(bias=False, act=nn.ReLU))
    assert not is_plain_mlp(Residual())
    assert not is_plain_mlp(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    assert not is_plain_mlp(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))

    class MyTanh(nn.Tanh):
        def forward(self, x):
            return 2 * torch.tanh(x)

    assert not is_plain_mlp(nn.Sequential(nn.Linear(2, 2), MyTanh()))
    assert PopulationPolicy(mlp(), population(mlp(), 2)).mode == "bmm"
    assert PopulationPolicy(Residual(), population(Residual(), 2)).mode == "vmap"
    with pytest.raises(ValueError, match="bmm"):
        PopulationPolicy(Residual(), population(Residual(), 2), mode="bmm")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.Identity])
@pytest.mark.parametrize("obs_shape", [(5,), (4, 5), (2, 3, 5)])
def test_mlp_fast_path_equals_vmap_equals_loop(bias, act, obs_shape):
    m = mlp(bias, act)
    b = 6
    params = population(m, b)
    x = torch.randn(b, *obs_shape, generator=torch.Generator().manual_seed(2))
    fast = PopulationPolicy(m, params)(x)
    generic = PopulationPolicy(m, params, mode="vmap")(x)
    assert fast.shape == (b, *obs_shape[:-1], 3)
    torch.testing.assert_close(fast, generic, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, loop_reference(m, params, x), rtol=1e-5, atol=1e-5)


def test_members_really_use_their_own_parameters():
    m = mlp()
    params = population(m, 3)
    params[1] = params[0]
    x = torch.randn(1, 5).expand(3, 5)
    out = PopulationPolicy(m, params)(x)
    assert torch.equal(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


@pytest.mark.parametrize("obs_shape", [(5,), (4, 5)])
def test_generic_module_equals_loop(obs_shape):
    m = Residual()
    params = population(m, 5)
    x = torch.randn(5, *obs_shape, generator=torch.Generator().manual_seed(3))
    policy = PopulationPolicy(m, params)
    assert policy.mode == "vmap" and len(policy) == 5
    torch.testing.assert_close(policy(x), loop_reference(m, params, x), rtol=1e-5, atol=1e-5)


def test_multiple_inputs_on_generic_path():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, x, y):
            return self.a(x) * self.b(y)

    m = TwoInputs()
    params = population(m, 4)
    x, y = torch.randn(4, 3), torch.randn(4, 4)
    out = PopulationPolicy(m, params)(x, y)
    clone = copy.deepcopy(m)
    with torch.no_grad():
        ref = torch.stack([load_flat(clone, params[i])(x[i], y[i]) for i in range(4)])
    torch.testing.assert_close(out, ref)


def test_inputs_are_cast_and_validated():
    m = mlp()
    policy = PopulationPolicy(m, population(m, 2))
    out = policy(torch.randn(2, 5, dtype=torch.float64))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="leading member dimension"):
        policy(torch.randn(3, 5))
    with pytest.raises(ValueError, match="columns"):
        PopulationPolicy(m, torch.zeros(2, num_params(m) + 1))
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        PopulationPolicy(m, torch.zeros(num_params(m)))


def test_end_to_end_with_perturbed_params():
    m = mlp()
    cfg = ESConfig(population_size=6, sigma=0.1)
    p = num_params(m)
    table = NoiseTable.from_seed(cfg.seed, 1 << 16)
    offs, signs = member_offsets(cfg.seed, 0, 6, p, table.size)
    params = perturbed_params(flatten_params(m), table, offs, signs, cfg.sigma, [1, 2, 3])
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(
        PopulationPolicy(m, params)(x), loop_reference(m, params, x), rtol=1e-5, atol=1e-5
    )


def test_fast_path_leading_activation_does_not_modify_the_input():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh())
    params = population(m, 3)
    x = torch.randn(3, 5)
    before = x.clone()
    policy = PopulationPolicy(m, params)
    assert policy.mode == "bmm"
    out = policy(x)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, loop_reference(m, params, x), rtol=0, atol=1e-6)


# Some activations are computed by a vectorised kernel in the body of a tensor and by a
# scalar one in its tail on CPU, rounding differently (sigmoid, SiLU, ELU, CELU, SELU,
# softplus, Mish; tanh, GELU and ReLU are controls), so without care a member's
# output depends on how many rows share its batch: the last member of a task, or of the
# rows still alive in a rollout, got other bits than the same member in a larger batch.
BATCH_INVARIANT_ACTS = [
    *(nn.Tanh, nn.Sigmoid, nn.SiLU, nn.GELU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish),
    nn.ReLU,
]


def row_subsets(b: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    subsets = [torch.arange(n) for n in range(1, b + 1)]
    subsets += [torch.arange(start, b) for start in range(1, b)]
    subsets += [torch.randperm(b, generator=g)[: int(k)].sort().values for k in (2, 5, 11, 23)]
    return subsets


@pytest.mark.parametrize("act", BATCH_INVARIANT_ACTS)
@pytest.mark.parametrize("threads", [1, 3])
def test_a_members_output_does_not_depend_on_the_rows_beside_it(act, threads):
    from threads import num_threads

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 9), act(), nn.Linear(9, 3), act())
    b = 37
    params = population(m, b)
    x = torch.randn(b, 7, generator=torch.Generator().manual_seed(4))
    with num_threads(threads):
        full = PopulationPolicy(m, params)(x)
        for rows in row_subsets(b):
            part = PopulationPolicy(m, params[rows])(x[rows])
            assert torch.equal(part, full[rows]), (act.__name__, rows.tolist())


@pytest.mark.parametrize("act", [nn.Tanh, nn.SiLU])
def test_batch_invariance_holds_for_tensors_that_span_several_threads(act):
    from threads import num_threads

    # 300 members x 8 envs x 64 hidden units: above the size at which torch splits an
    # elementwise op over threads, so the split points move with the row count.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(11, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 2))
    b = 300
    params = population(m, b)
    x = torch.randn(b, 8, 11, generator=torch.Generator().manual_seed(5))
    with num_threads(3):
        full = PopulationPolicy(m, params)(x)
    for threads, rows in [
        (1, torch.arange(297)),
        (2, torch.arange(1, 300)),
        (3, torch.arange(3, 290)),
    ]:
        with num_threads(threads):
            part = PopulationPolicy(m, params[rows])(x[rows])
        assert torch.equal(part, full[rows]), (threads, len(rows))


def test_an_in_place_activation_before_the_first_layer_leaves_the_input_alone():
    torch.manual_seed(0)
    m = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(5, 4), nn.ReLU(inplace=True))
    params = population(m, 3)
    x = torch.randn(3, 5)
    before = x.clone()
    out = PopulationPolicy(m, params)(x)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, loop_reference(m, params, before), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_a_zero_width_layer_gives_an_empty_output():
    m = nn.Sequential(nn.Linear(5, 0), nn.Tanh())
    out = PopulationPolicy(m, torch.zeros(3, num_params(m)))(torch.randn(3, 5))
    assert out.shape == (3, 0)
