"""Run one ``nn.Module`` for many population members at once.

``PopulationPolicy(module, params)`` with ``params`` of shape ``[B, P]`` (one flat parameter
vector per member, in the order of ``module.named_parameters()``) is called like the module
on inputs with a leading member dimension ``[B, ...]``: row ``b`` runs with member ``b``'s
parameters.

Two execution paths, same results (up to float rounding):

* generic: ``torch.func.functional_call`` + ``torch.func.vmap`` over the unflattened parameters;
  works for any module whose forward is vmappable and does not mutate buffers (e.g. no
  BatchNorm in training mode);
* fast path for plain MLPs (``nn.Sequential`` of ``nn.Linear`` and elementwise activations):
  one ``baddbmm`` per layer on stacked weight views (no copies), about 2-3x faster than vmap
  for small policies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "ParamSpec",
    "PopulationPolicy",
    "flatten_params",
    "is_plain_mlp",
    "load_flat",
    "num_params",
    "param_layout",
    "unflatten_params",
]

# Modules that act elementwise and hold no parameters: safe to apply to [B, N, F] directly.
# Exact type match on purpose, so a subclass with a custom forward takes the generic path.
_ELEMENTWISE = (
    nn.Identity,
    nn.Tanh,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanhshrink,
)


_CONTIGUOUS_COPY_LIMIT = 1 << 24  # elements of the stacked [B, P] parameters

# Batch invariance on CPU. torch's elementwise kernels run a vectorised loop over the body of
# a tensor and a scalar loop over its last few elements, and for some functions (sigmoid,
# SiLU, ELU, CELU, SELU, softplus, Mish in torch 2.13 on x86) the two round differently. A
# member's outputs
# would then depend on how many rows share its batch: the last member of a task, or of the
# rows still alive in a rollout, got other bits than in a larger batch, and a training's
# result depended on how the population was split over workers. So on CPU every activation
# runs on a buffer padded to a whole number of vector blocks (no scalar tail), in chunks
# below torch's parallel grain (32768 elements) so that thread-count-dependent split points
# cannot make tails either (GELU splits below that grain, but its two loops agree).
_PAD = 128  # elements: two vectors of the widest SIMD unit torch targets (ARM SVE 2048-bit)
_SERIAL_CHUNK = 16384  # a multiple of _PAD below torch's parallel grain


def _tanh_via_sigmoid_(h: torch.Tensor) -> torch.Tensor:
    # tanh(x) = 2 * sigmoid(2x) - 1, in place. torch's CPU tanh kernel is ~6x slower than its
    # sigmoid here (169 vs 29 us for 256x8x64 on the AVX-512 dev box), and tanh dominated the
    # MLP forward. Absolute error <= ~2.5e-7 (no relative accuracy near 0), irrelevant for a
    # policy; used on CPU only.
    return h.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _padded_buffer(shape: tuple[int, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat buffer of whole ``_PAD`` blocks and a view of its head shaped ``shape``."""
    n = math.prod(shape)
    # Zeros, not empty: the activations run over the padding too, which must stay finite.
    size = -(-n // _PAD) * _PAD
    buffer = torch.zeros(size, dtype=like.dtype, device=like.device)
    return buffer, (buffer if size == n else buffer[:n]).view(shape)


def _elementwise_in_place(step: _Step, buffer: torch.Tensor) -> None:
    """``buffer[:] = step(buffer)``, each element through torch's vectorised kernel path."""
    # One thread runs the whole buffer in one loop; more would split it at points that move
    # with the row count, so then it goes in serial chunks (activations cost little next to
    # the matrix products, which keep their threads).
    n = buffer.numel()
    size = max(n, 1) if torch.get_num_threads() == 1 else _SERIAL_CHUNK
    for start in range(0, n, size):
        chunk = buffer if size >= n else buffer[start : start + size]
        if step is _tanh_via_sigmoid_:
            _tanh_via_sigmoid_(chunk)
        else:
            assert callable(step)
            chunk.copy_(step(chunk))


_Step = (
    nn.Module | Callable[[torch.Tensor], torch.Tensor] | tuple[torch.Tensor, torch.Tensor | None]
)


@dataclass(frozen=True)
class ParamSpec:
    """Where one named parameter lives in the flat vector: ``flat[offset : offset + numel]``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


def param_layout(module: nn.Module) -> list[ParamSpec]:
    """The flat layout: ``module.named_parameters()`` order, each parameter flattened (C order)."""
    layout = []
    offset = 0
    for name, p in module.named_parameters():
        layout.append(ParamSpec(name, tuple(p.shape), offset, p.numel()))
        offset += p.numel()
    return layout


def num_params(module: nn.Module) -> int:
    """Number of scalars in the flat parameter vector of ``module``."""
    return sum(p.numel() for p in module.parameters())


def flatten_params(module: nn.Module) -> torch.Tensor:
    """All parameters as one new float32 CPU tensor ``[P]`` (``named_parameters()`` order)."""
    parts = [
        p.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for p in module.parameters()
    ]
    if not parts:
        raise ValueError(f"{type(module).__name__} has no parameters to optimise")
    return torch.cat(parts)


def unflatten_params(module: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of ``flat`` (``[P]`` or ``[B, P]``) shaped like ``module``'s parameters.

    Returns ``{name: tensor}`` with shapes ``param.shape`` or ``[B, *param.shape]``.
    """
    layout = param_layout(module)
    total = sum(s.numel for s in layout)
    if flat.shape[-1] != total or flat.dim() not in (1, 2):
        raise ValueError(
            f"expected a [P] or [B, P] tensor with P={total} for {type(module).__name__}, "
            f"got shape {tuple(flat.shape)}"
        )
    lead = tuple(flat.shape[:-1])
    return {s.name: flat[..., s.offset : s.offset + s.numel].view(*lead, *s.shape) for s in layout}


def load_flat(module: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat ``[P]`` vector into ``module``'s parameters in place; returns ``module``."""
    if flat.dim() != 1:
        raise ValueError(f"expected a flat [P] tensor, got shape {tuple(flat.shape)}")
    views = unflatten_params(module, flat)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(views[name])
    return module


def _iter_mlp(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]] | None:
    items: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        qual = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            sub = _iter_mlp(child, f"{qual}.")
            if sub is None:
                return None
            items.extend(sub)
        elif type(child) is nn.Linear or type(child) in _ELEMENTWISE:
            items.append((qual, child))
        else:
            return None
    return items


def is_plain_mlp(module: nn.Module) -> bool:
    """True when ``module`` qualifies for the ``bmm`` fast path: an ``nn.Sequential`` (possibly
    nested) of ``nn.Linear`` and parameter-free elementwise activations, with no buffers."""
    if type(module) is not nn.Sequential or any(True for _ in module.buffers()):
        return False
    items = _iter_mlp(module, "")
    return items is not None and any(isinstance(m, nn.Linear) for _, m in items)


class PopulationPolicy:
    """``module`` evaluated with ``B`` parameter vectors at once.

    Args:
        module: the policy; its own parameter values are ignored (only its structure, and its
            buffers on the generic path, are used). Put it on the evaluation device.
        params: ``[B, P]`` float tensor, row ``b`` = member ``b``'s flat parameters.
        mode: ``"auto"`` (fast path when :func:`is_plain_mlp`), ``"vmap"`` or ``"bmm"``.

    Calling ``policy(x)`` with ``x`` of shape ``[B, ...]`` returns the module's output with the
    same leading ``B``. For MLPs ``x`` may be ``[B, in]`` or ``[B, N, in]`` (N environments per
    member) or have more middle dimensions. Floating inputs are cast to ``params``' device and
    dtype. Runs under ``torch.no_grad()``; the vmap path uses ``randomness="different"`` (each
    member samples its own random numbers, e.g. for stochastic policies).

    Fast path notes: the stacked weights are built from ``params`` at the first call (a copy
    while ``B * P <= 2**24``), so do not modify ``params`` in place afterwards; make a new
    ``PopulationPolicy`` per batch of members instead (cheap). On CPU ``nn.Tanh`` is computed
    as ``2 * sigmoid(2x) - 1`` (absolute error below 2.5e-7, several times faster there).

    Batch invariance: on CPU the fast path gives row ``b`` the same bits whatever other rows
    share the batch and whatever the thread count, so a member's reward does not depend on
    how the population is split into tasks or on which members are still alive. The vmap
    path is as invariant as the module's ops: torch's CPU sigmoid, SiLU, ELU, CELU, SELU,
    softplus and Mish round a tensor's last elements differently (tanh, ReLU, GELU and the
    matrix products do not; torch 2.13, x86). On CUDA it rests on cuBLAS's kernel choice and
    is not tested.
    """

    def __init__(
        self,
        module: nn.Module,
        params: torch.Tensor,
        mode: Literal["auto", "vmap", "bmm"] = "auto",
    ) -> None:
        if params.dim() != 2:
            raise ValueError(f"params must be [B, P], got shape {tuple(params.shape)}")
        self.module = module
        self.params = params
        self.layout = param_layout(module)
        total = sum(s.numel for s in self.layout)
        if params.shape[1] != total:
            raise ValueError(
                f"params have {params.shape[1]} columns but {type(module).__name__} has "
                f"{total} parameters"
            )
        fast = is_plain_mlp(module)
        if mode == "bmm" and not fast:
            raise ValueError(
                "mode='bmm' needs an nn.Sequential of nn.Linear and elementwise activations"
            )
        if mode not in ("auto", "vmap", "bmm"):
            raise ValueError(f"mode must be 'auto', 'vmap' or 'bmm', got {mode!r}")
        self.mode: Literal["vmap", "bmm"] = "bmm" if fast and mode != "vmap" else "vmap"
        self._spec = {s.name: s for s in self.layout}
        self._plan: list[_Step] | None = None

    @property
    def batch_size(self) -> int:
        return self.params.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def member(self, b: int) -> nn.Module:
        """The module holding member ``b``'s parameters, for code that takes one model
        (``model.generate``, a simulator's controller). They are written into ``self.module``
        in place, so the next call replaces them: use the module before asking for another."""
        if not -self.batch_size <= b < self.batch_size:
            raise IndexError(f"member {b} of a batch of {self.batch_size}")
        return load_flat(self.module, self.params[b])

    def __call__(self, *inputs: torch.Tensor, **options: Any) -> Any:
        """Runs the members on ``inputs`` (each ``[B, ...]``). Keyword ``options`` go to the
        module's forward unchanged, the same for every member (e.g. ``use_cache=False`` for a
        Hugging Face model); the output may be any tree of tensors with the leading ``B``."""
        inputs = tuple(self._prepare(x) for x in inputs)
        with torch.no_grad():
            if self.mode == "bmm":
                if len(inputs) != 1 or options:
                    raise TypeError(
                        f"an MLP takes one input and no options, got {len(inputs)} inputs and "
                        f"options {sorted(options)}"
                    )
                return self._forward_bmm(inputs[0])
            return self._forward_vmap(inputs, options)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() == 0 or x.shape[0] != self.batch_size:
            raise ValueError(
                f"inputs need a leading member dimension of size {self.batch_size}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.is_floating_point():
            x = x.to(device=self.params.device, dtype=self.params.dtype)
        else:
            x = x.to(device=self.params.device)
        return x

    def _cols(self, name: str, *shape: int) -> torch.Tensor:
        s = self._spec[name]
        return self.params[:, s.offset : s.offset + s.numel].view(self.batch_size, *shape)

    def _build_plan(self) -> list[_Step]:
        items = _iter_mlp(self.module, "")
        assert items is not None
        # Row-major [B, in, out] weight copies make bmm ~20% faster than the strided views;
        # only worth the memory while the stacked weights are small.
        copy = self.params.numel() <= _CONTIGUOUS_COPY_LIMIT
        plan: list[_Step] = []
        for name, layer in items:
            if isinstance(layer, nn.Linear):
                w = self._cols(f"{name}.weight", layer.out_features, layer.in_features)
                w = w.transpose(1, 2)
                bias = None
                if layer.bias is not None:
                    bias = self._cols(f"{name}.bias", 1, layer.out_features)
                if copy:
                    w = w.contiguous()
                    bias = None if bias is None else bias.contiguous()
                plan.append((w, bias))
            elif type(layer) is nn.Tanh and self.params.device.type == "cpu":
                plan.append(_tanh_via_sigmoid_)
            else:
                plan.append(layer)
        return plan

    def _forward_bmm(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batch_size
        if x.dim() < 2:
            raise ValueError(f"MLP input must be [B, in] or [B, ..., in], got {tuple(x.shape)}")
        if self._plan is None:
            self._plan = self._build_plan()
        cpu = self.params.device.type == "cpu"
        middle = x.shape[1:-1]
        h = x_view = x.reshape(b, -1, x.shape[-1])
        padded: torch.Tensor | None = None  # the padded CPU buffer whose head is h, if any
        for step in self._plan:
            if isinstance(step, tuple):
                w, bias = step
                out = None
                if cpu:
                    padded, out = _padded_buffer((b, h.shape[1], w.shape[-1]), h)
                h = torch.bmm(h, w, out=out) if bias is None else torch.baddbmm(bias, h, w, out=out)
            elif cpu:
                if padded is None:  # an activation before the first layer: never touch x
                    padded, head = _padded_buffer(tuple(h.shape), h)
                    h = head.copy_(h)
                _elementwise_in_place(step, padded)  # h is a view of padded's head
            else:
                # An in-place activation (ReLU(inplace=True)) before the first layer would
                # write into the caller's x.
                h = step(h.clone() if h is x_view else h)
        return h.reshape(b, *middle, h.shape[-1])

    def _forward_vmap(self, inputs: tuple[torch.Tensor, ...], options: dict[str, Any]) -> Any:
        params = {
            s.name: self.params[:, s.offset : s.offset + s.numel].view(self.batch_size, *s.shape)
            for s in self.layout
        }
        device = self.params.device
        buffers = {name: buf.to(device) for name, buf in self.module.named_buffers()}
        module = self.module

        def run(p: dict[str, torch.Tensor], *xs: torch.Tensor) -> Any:
            return torch.func.functional_call(module, (p, buffers), xs, options)

        return torch.func.vmap(run, in_dims=(0,) + (0,) * len(inputs), randomness="different")(
            params, *inputs
        )
