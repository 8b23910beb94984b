"""A population forward pass that shares the base weights: low-rank members at near the cost of
plain inference.

:class:`LowRankPolicy` runs any module for ``B`` low-rank members (:mod:`evochi_torch.lowrank`)
at once. Under ``torch.func.vmap`` over the members, every ``F.linear(x, W, b)`` whose weight
is a low-rank parameter becomes::

    x @ W.T + b  +  (x @ B_i) @ (s_i * sigma / sqrt(r) * A_i).T

The first term sees the *shared* ``W`` (vmap turns it into one matrix product over every
member's rows, the same GEMM plain inference runs), the second is a batched rank-r product.
``F.embedding`` gets the same treatment (``W[idx] + A_i[idx] @ B_i.T``) and
``nn.MultiheadAttention`` runs through a re-implementation built on the same linear maps. The
calls are found by a ``TorchFunctionMode``, so the user's module is not rewritten. A low-rank
weight used by any other operation (``x @ self.weight.T``, a learned positional table added to
the input) is materialised for that operation only, per member, with a one-time warning naming
it: the result is right, only the memory is spent.

Memory per call: the activations plus ``B x r x (m + n)`` factor values per matrix and the
per-member copies of the small dense parameters; never ``B x parameters``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .lowrank import LowRankNoise

__all__ = ["LowRankPolicy"]

log = logging.getLogger("evochi_torch.lowrank")


class LowRankPolicy:
    """``module`` evaluated for a batch of low-rank population members.

    Args:
        module: the policy on the evaluation device (its own values are unused; its buffers
            are). Put it in ``eval()`` mode: dropout in training mode is refused.
        center: the center parameters ``[P]`` (on the evaluation device: the worker keeps
            one copy there per epoch).
        noise: the run's :class:`~evochi_torch.lowrank.LowRankNoise`.
        offsets, signs: the epoch's ``(offsets, signs)`` (the strategy's ``ask``).
        sigma: the perturbation scale (a float).
        members: int64 indices of the members to run.
        members_per_call: how many members one vmapped forward pass runs; ``None``: on a
            CPU, as many as make about 2048 input rows (the activations then stay in the
            CPU's cache), elsewhere all of them. A member's output is the same for any value.

    ``policy(x)`` with ``x`` of shape ``[B, ...]`` runs row ``b`` with member ``members[b]``,
    like :class:`~evochi_torch.population.PopulationPolicy`.
    """

    mode = "lowrank"

    def __init__(
        self,
        module: nn.Module,
        center: torch.Tensor,
        noise: LowRankNoise,
        offsets: torch.Tensor,
        signs: torch.Tensor,
        sigma: float,
        members: torch.Tensor,
        members_per_call: int | None = None,
    ) -> None:
        if isinstance(sigma, torch.Tensor):
            raise ValueError("low-rank perturbations need a scalar sigma")
        if members_per_call is not None and members_per_call < 1:
            raise ValueError(f"members_per_call must be at least 1, got {members_per_call}")
        self.members_per_call = members_per_call
        layout = noise.layout
        named = list(module.named_parameters())
        if [tuple(p.shape) for _, p in named] != list(layout.shapes):
            raise ValueError(
                f"{type(module).__name__}'s parameter shapes differ from the training's "
                "low-rank layout"
            )
        if center.shape != (layout.num_params,):
            raise ValueError(f"center must be [{layout.num_params}], got {tuple(center.shape)}")
        self.module = module
        device = center.device
        members = members.to(torch.int64).reshape(-1)
        self._count = members.numel()
        # The gathered windows become the members' values in place: no further copies.
        dense, factors = noise.member_windows(offsets, members.cpu(), device)
        scale = (signs[members.cpu()].to(torch.float32) * float(sigma)).to(device)
        dense.mul_(scale[:, None])
        self.base: dict[str, torch.Tensor] = {}
        self.batched: dict[str, torch.Tensor] = {}
        for seg in layout.dense:
            name = named[seg.index][0]
            rows = dense[:, seg.window : seg.window + seg.numel]
            rows.add_(center[seg.offset : seg.offset + seg.numel])
            self.batched[name] = rows.view(self._count, *seg.shape)
        a_scale = (scale / math.sqrt(layout.rank))[:, None, None]
        shift = layout.dense_size
        for seg in layout.lowrank:
            name = named[seg.index][0]
            self.base[name] = center[seg.offset : seg.offset + seg.numel].view(seg.shape)
            r = layout.rank
            a0 = seg.window - shift
            a = factors[:, a0 : a0 + seg.rows * r].view(self._count, seg.rows, r).mul_(a_scale)
            b = factors[:, a0 + seg.rows * r : a0 + (seg.rows + seg.cols) * r]
            b = b.view(self._count, seg.cols, r)
            if r == 1:
                # ``x @ B`` with one column runs as a matrix-vector kernel whose rounding
                # depends on the batch; a zero second column keeps it a (batch-invariant)
                # matrix product.
                b = torch.cat([b, torch.zeros_like(b)], dim=-1)
            self.batched["a:" + name] = a
            self.batched["b:" + name] = b
        self.rank = layout.rank
        self.buffers = {n: buf.to(device) for n, buf in module.named_buffers()}
        self.device = device

    @property
    def batch_size(self) -> int:
        return self._count

    def __len__(self) -> int:
        return self._count

    def member(self, b: int) -> nn.Module:
        """The module holding the parameters of member ``members[b]``, for code that takes one
        model (``model.generate``, a simulator's controller). They are written into
        ``self.module`` in place (one member's memory, no more), so the next call replaces
        them: use the module before asking for another member."""
        if not -self._count <= b < self._count:
            raise IndexError(f"member {b} of a batch of {self._count}")
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                if name in self.base:
                    a = self.batched["a:" + name][b]
                    v = self.batched["b:" + name][b, :, : self.rank]
                    p.copy_(torch.addmm(self.base[name], a, v.T))
                else:
                    p.copy_(self.batched[name][b])
        return self.module

    def __call__(self, *inputs: torch.Tensor, **options: Any) -> Any:
        """Runs the members on ``inputs`` (each ``[B, ...]``); keyword ``options`` go to the
        module's forward unchanged, the same for every member."""
        xs = []
        for x in inputs:
            x = torch.as_tensor(x)
            if x.dim() == 0 or x.shape[0] != self._count:
                raise ValueError(
                    f"inputs need a leading member dimension of size {self._count}, "
                    f"got shape {tuple(x.shape)}"
                )
            xs.append(
                x.to(device=self.device, dtype=torch.float32)
                if x.is_floating_point()
                else x.to(device=self.device)
            )
        step = self._members_per_call(xs)
        if step >= self._count:
            return self._run(self.batched, xs, options)
        parts = [
            self._run(
                {k: v[s : s + step] for k, v in self.batched.items()},
                [x[s : s + step] for x in xs],
                options,
            )
            for s in range(0, self._count, step)
        ]
        # vmap's outputs are trees of tensors, each with the member dimension first.
        return tree_map(lambda *ts: torch.cat(ts), parts[0], *parts[1:])

    def _members_per_call(self, xs: list[torch.Tensor]) -> int:
        if self.members_per_call is not None:
            return self.members_per_call
        if self.device.type != "cpu" or self._count == 0:
            return max(1, self._count)
        # A float input's last dimension is its features; token ids are one row each. Inputs
        # that travel together (ids and their mask) describe the same rows: the largest counts.
        rows = max(
            (
                x[0].numel() // max(1, x.shape[-1])
                if x.is_floating_point() and x.dim() > 1
                else x[0].numel()
                for x in xs
            ),
            default=1,
        )
        return max(1, _CPU_ROWS // max(1, rows))

    def _run(self, batched: dict[str, torch.Tensor], xs: list[torch.Tensor], options: Any) -> Any:
        module, base, buffers, rank = self.module, self.base, self.buffers, self.rank

        def run(batched: dict[str, torch.Tensor], *member_inputs: torch.Tensor) -> Any:
            params = dict(base)
            factors: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = {}
            for key, value in batched.items():
                if key.startswith("a:"):
                    name = key[2:]
                    factors[id(base[name])] = (value, batched["b:" + name], name)
                elif not key.startswith("b:"):
                    params[key] = value
            with _LowRankMode(factors, rank):
                return torch.func.functional_call(module, (params, buffers), member_inputs, options)

        with torch.no_grad():
            return torch.func.vmap(run, randomness="different")(batched, *xs)


_WARNED: set[str] = set()

# Input rows per vmapped call on a CPU. A population's intermediates (the feed-forward block's
# hidden layer, a member's own bias, layer-norm affine, activation and low-rank terms, each a
# pass over memory the plain module fuses away) stay in the last-level cache at this size; all
# members at once stream them through DRAM. Measured on a 19M-parameter transformer with 512
# rows per member: 32 members on one thread, 0.74x of plain inference in one call, 0.90x in
# calls of 4; 256 members on 2 threads in calls of 4, 1.00x (docs/lowrank.md).
_CPU_ROWS = 2048

# From this many rows per member the low-rank term is accumulated by a product (one pass over
# the output), below it added column by column.
_ACCUMULATE_ROWS = 64

# Rows per matrix product of the shared weights on CPU. A CPU GEMM's row results depend on how
# many rows it is given (MKL picks kernels by size), but not on where a row sits among a fixed
# number of them: products over whole, zero-padded blocks of this many rows give a member the
# same bits however the population is split into tasks.
_ROW_BLOCK = 128


def _blocked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if x.device.type != "cpu" or rows.shape[0] == 0:
        return F.linear(x, weight)
    count = rows.shape[0]
    padded = -(-count // _ROW_BLOCK) * _ROW_BLOCK
    if padded != count:
        rows = torch.cat([rows, rows.new_zeros(padded - count, rows.shape[1])])
    blocks = padded // _ROW_BLOCK
    # One batched product over the blocks (one parallel region, the weight not copied).
    wt = weight.t()
    out = torch.bmm(rows.view(blocks, _ROW_BLOCK, -1), wt.expand(blocks, *wt.shape))
    return out.view(padded, -1)[:count].reshape(*x.shape[:-1], weight.shape[0])


class _SharedLinear(torch.autograd.Function):
    # An autograd.Function only for its vmap rule: under vmap the members' rows reach
    # ``_blocked_linear`` as one physical tensor, so the shared weight is read once for all.

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _blocked_linear(x, weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, int | None], x, weight):
        x_dim, w_dim = in_dims
        if w_dim is not None:  # a per-member weight: nothing shared to exploit
            weight = weight.movedim(w_dim, 0)
            x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(info.batch_size, *x.shape)
            return torch.stack([F.linear(xi, wi) for xi, wi in zip(x, weight, strict=True)]), 0
        if x_dim is None:
            return _SharedLinear.apply(x, weight), None
        return _SharedLinear.apply(x.movedim(x_dim, 0), weight), 0


def shared_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (no bias), batch-invariant on CPU (see ``_ROW_BLOCK``); under ``vmap``
    the members' rows form one product with the shared weight instead of one per member."""
    return _SharedLinear.apply(x, weight)


class _LowRankMode(TorchFunctionMode):
    """Routes the uses of low-rank weights (by identity) to their shared-weight forms."""

    def __init__(
        self, factors: dict[int, tuple[torch.Tensor, torch.Tensor, str]], rank: int
    ) -> None:
        super().__init__()
        self.factors = factors
        self.rank = rank

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return self.linear(*args, **kwargs)
        if func is F.embedding and self._get(args[1] if len(args) > 1 else kwargs["weight"]):
            return self.embedding(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return _multi_head_attention(self, *args, **kwargs)
        if func is torch.addmm and len(args) == 3 and not kwargs and self._get(args[2]):
            return self.addmm(*args)
        if not self._touches(args, kwargs):
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        if not _has_tensor(result):
            return result  # metadata: shape, dtype, device...
        return func(*self._materialize(args, func), **self._materialize(kwargs, func))

    def _get(self, w: Any) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        return self.factors.get(id(w)) if isinstance(w, torch.Tensor) else None

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``F.linear(x, weight[rows], bias[rows])`` plus the member's low-rank term."""
        found = self._get(weight)
        if rows is not None:
            weight = weight[rows[0] : rows[1]]
            bias = None if bias is None else bias[rows[0] : rows[1]]
        if found is None:
            return F.linear(x, weight, bias)
        y = shared_linear(x, weight)
        if bias is not None:
            y = _add(y, bias)
        a, b, _ = found
        if rows is not None:
            a = a[rows[0] : rows[1]]
        return _add_low_rank_(y, x @ b, a, self.rank)

    def addmm(self, bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``bias + x @ weight`` with ``weight`` stored ``[in, out]`` (GPT-2's ``Conv1D``): the
        shared product plus ``(x @ A) @ B.T``."""
        found = self._get(weight)
        assert found is not None
        a, b, _ = found
        y = _add(shared_linear(x, weight.T), bias)
        if self.rank == 1:
            # A one-column product rounds by the batch (see LowRankPolicy's ``b``).
            a = F.pad(a, (0, 1))
        return _add_low_rank_(y, x @ a, b, self.rank)

    def embedding(self, idx: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any):
        found = self._get(weight)
        assert found is not None
        a, b, name = found
        max_norm = args[1] if len(args) > 1 else kwargs.get("max_norm")
        if max_norm is not None:
            raise ValueError(f"low-rank perturbations do not support {name}'s max_norm")
        out = F.embedding(idx, weight, *args, **kwargs)
        return _add_low_rank_(out, F.embedding(idx, a), b, self.rank)

    def _touches(self, args: Any, kwargs: dict[str, Any]) -> bool:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and id(value) in self.factors:
                return True
            if isinstance(value, list | tuple) and any(
                isinstance(v, torch.Tensor) and id(v) in self.factors for v in value
            ):
                return True
        return False

    def _materialize(self, tree: Any, func: Any) -> Any:
        if isinstance(tree, dict):
            return {k: self._materialize(v, func) for k, v in tree.items()}
        if isinstance(tree, list | tuple):
            return type(tree)(self._materialize(v, func) for v in tree)
        found = self._get(tree)
        if found is None:
            return tree
        a, b, name = found
        if name not in _WARNED:
            _WARNED.add(name)
            log.warning(
                "low-rank parameter %r is used by %s, not by a linear map or an embedding: "
                "its perturbation is materialised per member for that use (memory members x "
                "%d values)",
                name,
                getattr(func, "__name__", func),
                tree.numel(),
            )
        # Out of place: under vmap the shared weight is one tensor, the term one per member.
        return tree + _low_rank_term(a, b, self.rank)


def _add(out: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``out + term``, in place when ``out`` may take it: under vmap an output computed from
    inputs shared by every member (positions from ``arange``) has no member dimension, and an
    in-place add of a per-member term into it is refused before anything is written."""
    try:
        return out.add_(term)
    except RuntimeError:
        return out + term


def _add_low_rank_(out: torch.Tensor, u: torch.Tensor, v: torch.Tensor, rank: int) -> torch.Tensor:
    """``out + u[..., :rank] @ v[:, :rank].T``, into ``out``'s memory where it is the members'
    own (``u``: ``[..., rank]`` or wider, ``v``: ``[n, rank]`` or wider). ``out`` must be a
    fresh result the caller owns: its old values may be overwritten."""
    u, v = u[..., :rank], v[:, :rank]
    if out.is_contiguous() and out.numel() >= _ACCUMULATE_ROWS * out.shape[-1]:
        flat = _AccumulateProduct.apply(out.view(-1, out.shape[-1]), u.reshape(-1, rank), v.T)
        return flat.view(out.shape)
    # A member's few rows (a decoding step): column by column, each product and sum exactly
    # rounded, beats a product with a handful of inner columns.
    for j in range(rank):
        out = _add(out, u[..., j : j + 1] * v[:, j])
    return out


class _AccumulateProduct(torch.autograd.Function):
    # ``out + u @ w`` as one pass over ``out``: a GEMM with ``rank`` inner columns accumulating
    # into it (a separate term and add would write and read a temporary the size of ``out``,
    # 3.5x slower at 512 rows per member, rank 1). An autograd.Function for its vmap rule:
    # torch has no batching rule for ``addmm_``, and its fallback loops over the members.

    @staticmethod
    def forward(out: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.addmm(out, u, w)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, int | None, int | None], out, u, w):
        n = info.batch_size
        u, w = (
            t.movedim(d, 0) if d is not None else t.expand(n, *t.shape)
            for t, d in ((u, in_dims[1]), (w, in_dims[2]))
        )
        if in_dims[0] is None:  # an output shared by every member: a new one per member
            return torch.baddbmm(out.expand(n, *out.shape), u, w), 0
        return out.movedim(in_dims[0], 0).baddbmm_(u, w), 0


def _low_rank_term(u: torch.Tensor, v: torch.Tensor, rank: int) -> torch.Tensor:
    """``u[..., :rank] @ v[:, :rank].T`` as a new tensor."""
    return u[..., :rank] @ v[:, :rank].T


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, list | tuple):
        return any(_has_tensor(v) for v in value)
    return False


def _multi_head_attention(
    mode: _LowRankMode,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    bias_v: torch.Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    training: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: torch.Tensor | None = None,
    k_proj_weight: torch.Tensor | None = None,
    v_proj_weight: torch.Tensor | None = None,
    static_k: torch.Tensor | None = None,
    static_v: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.multi_head_attention_forward`` (sequence-first) with low-rank projections."""
    if bias_k is not None or bias_v is not None or add_zero_attn:
        raise ValueError(
            "low-rank perturbations do not support MultiheadAttention's add_bias_kv "
            "or add_zero_attn"
        )
    if static_k is not None or static_v is not None:
        raise ValueError("low-rank perturbations do not support static_k/static_v")
    if training and dropout_p > 0.0:
        raise ValueError("attention dropout in training mode: call module.eval() to score members")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt, n, embed = query.shape
    src = key.shape[0]
    if embed != embed_dim_to_check:
        raise ValueError(f"query has embedding size {embed}, expected {embed_dim_to_check}")
    heads = num_heads
    head = embed // heads
    if not use_separate_proj_weight:
        assert in_proj_weight is not None
        if query is key and key is value:
            q, k, v = mode.linear(query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
        else:
            q = mode.linear(query, in_proj_weight, in_proj_bias, rows=(0, embed))
            k = mode.linear(key, in_proj_weight, in_proj_bias, rows=(embed, 2 * embed))
            v = mode.linear(value, in_proj_weight, in_proj_bias, rows=(2 * embed, 3 * embed))
    else:
        assert q_proj_weight is not None and k_proj_weight is not None
        assert v_proj_weight is not None
        biases: list[torch.Tensor | None] = (
            [None, None, None] if in_proj_bias is None else list(in_proj_bias.chunk(3))
        )
        q = mode.linear(query, q_proj_weight, biases[0])
        k = mode.linear(key, k_proj_weight, biases[1])
        v = mode.linear(value, v_proj_weight, biases[2])
    # [len, n, embed] -> [n, heads, len, head]
    q = q.reshape(tgt, n, heads, head).permute(1, 2, 0, 3)
    k = k.reshape(src, n, heads, head).permute(1, 2, 0, 3)
    v = v.reshape(src, n, heads, head).permute(1, 2, 0, 3)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(head))
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=query.device).triu(1)
    if attn_mask is not None:
        mask = _additive(attn_mask, scores.dtype)
        if mask.dim() == 3:  # [n * heads, tgt, src]
            mask = mask.view(n, heads, tgt, src)
        scores = scores + mask
    if key_padding_mask is not None:
        scores = scores + _additive(key_padding_mask, scores.dtype).view(n, 1, 1, src)
    weights = scores.softmax(dim=-1)
    out = (weights @ v).permute(2, 0, 1, 3).reshape(tgt, n, embed)
    out = mode.linear(out, out_proj_weight, out_proj_bias)
    attn: torch.Tensor | None = None
    if need_weights:
        attn = weights.mean(dim=1) if average_attn_weights else weights
        if unbatched:
            attn = attn.squeeze(0)
    if unbatched:
        out = out.squeeze(1)
    return out, attn


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)
