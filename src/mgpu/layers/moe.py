"""Mixture-of-experts MLP: a replicated router, then each token's top-k experts.

Two ways to split the experts over the ``tp`` ranks of the tensor-parallel group::

    tensor parallel (default)           expert parallel (--enable-expert-parallel)
    every rank holds every expert,      rank r holds experts [r E / tp, (r+1) E / tp) whole
    each sliced like a dense MLP:       (the first E mod tp ranks take one more)
    gate/up rows and down columns / tp

Either way attention has left every token's hidden state on every rank of the group (its o_proj
all-reduce), so the router runs on every rank and the dispatch needs no communication: each rank
picks the (token, expert) pairs of the experts it holds. The combine is one all-reduce of the
(tokens, hidden) output, summing partial products (tensor parallel) or whole experts' outputs
(expert parallel): the same single collective as a dense MLP's down_proj. This is what vLLM does
when expert parallelism spans the TP group alone; an all-to-all only pays when attention is data
parallel and each rank starts with different tokens. The ranks agree on the routing because the
all-reduce leaves bit-identical hidden states on all of them (``distributed/shm.py`` sums the parts
in one order on every rank; gloo and NCCL return one result to all).

Routing is computed once per layer for the whole step: the (token, expert) pairs are sorted by
expert, and each local expert runs one pair of matmuls over all of its tokens (a loop over experts,
never over tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mgpu.distributed import parallel_state as ps
from mgpu.distributed.communication import tp_all_reduce
from mgpu.errors import ModelLoadError
from mgpu.layers.linear import LazyTensor, _copy, check_shape, load_replicated

_expert_parallel = False


@contextlib.contextmanager
def expert_parallel(enabled: bool) -> Iterator[None]:
    """MoE layers built inside this context place whole experts on ranks (``enabled``) or slice
    every expert over the TP group (the default). The model runner wraps model construction in it.
    """
    global _expert_parallel
    previous, _expert_parallel = _expert_parallel, enabled
    try:
        yield
    finally:
        _expert_parallel = previous


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """``[first, end)`` experts of rank ``ep_rank`` of ``ep_size``; first ranks take the rest."""
    base, extra = divmod(num_experts, ep_size)
    first = ep_rank * base + min(ep_rank, extra)
    return first, first + base + (1 if ep_rank < extra else 0)


class ExpertWeights(nn.Module):
    """The stacked gate/up and down matrices of this rank's experts.

    ``w13`` is (local experts, 2 * local inter, hidden) laid out per expert as [gate | up]; ``w2``
    is (local experts, hidden, local inter). Each parameter lists the checkpoint tensors it is
    filled from in ``hf_names``: (name relative to this module, shard id), the shard id being
    (local expert, 0 for gate / 1 for up / None for down).

    Args:
        hidden_size: model width.
        intermediate_size: width of one expert's MLP.
        num_experts: experts in the layer (all ranks together).
        names: checkpoint names of an expert's gate, up and down projections, e.g.
            ``("w1", "w3", "w2")`` for Mixtral.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        names: tuple[str, str, str],
    ):
        super().__init__()
        tp, tp_rank = ps.get_tp_size(), ps.get_tp_rank()
        self.is_expert_parallel = _expert_parallel and tp > 1
        if self.is_expert_parallel:
            self.first_expert, end = expert_range(num_experts, tp, tp_rank)
            self.slice_rank, self.slice_size = 0, 1
        else:
            self.first_expert, end = 0, num_experts
            self.slice_rank, self.slice_size = tp_rank, tp
            if intermediate_size % tp:
                raise ModelLoadError(
                    f"expert width {intermediate_size} does not divide by TP size {tp}; "
                    "--enable-expert-parallel places whole experts on ranks instead"
                )
        self.num_experts, self.num_local_experts = num_experts, end - self.first_expert
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.local_inter = intermediate_size // self.slice_size
        local = self.num_local_experts
        self.w13 = nn.Parameter(
            torch.empty(local, 2 * self.local_inter, hidden_size), requires_grad=False
        )
        self.w2 = nn.Parameter(
            torch.empty(local, hidden_size, self.local_inter), requires_grad=False
        )
        gate, up, down = names
        experts = [(e - self.first_expert, e) for e in range(self.first_expert, end)]
        self.w13.hf_names = [  # type: ignore[attr-defined]
            (f"{e}.{name}.weight", (i, j)) for i, e in experts for j, name in enumerate((gate, up))
        ]
        self.w2.hf_names = [(f"{e}.{down}.weight", (i, None)) for i, e in experts]  # type: ignore[attr-defined]
        self.w13.weight_loader = self._load_w13  # type: ignore[attr-defined]
        self.w2.weight_loader = self._load_w2  # type: ignore[attr-defined]

    def _load_w13(self, param: nn.Parameter, loaded: LazyTensor, shard: tuple[int, int]) -> None:
        """This rank's rows of one expert's (inter, hidden) gate or up projection."""
        check_shape(loaded, (self.intermediate_size, self.hidden_size), param.checkpoint_name)  # type: ignore[attr-defined]
        expert, part = shard
        rows = self.local_inter
        start = self.slice_rank * rows
        _copy(param[expert, part * rows : (part + 1) * rows], loaded[start : start + rows])

    def _load_w2(self, param: nn.Parameter, loaded: LazyTensor, shard: tuple[int, None]) -> None:
        """This rank's columns of one expert's (hidden, inter) down projection."""
        check_shape(loaded, (self.hidden_size, self.intermediate_size), param.checkpoint_name)  # type: ignore[attr-defined]
        start = self.slice_rank * self.local_inter
        _copy(param[shard[0]], loaded[:, start : start + self.local_inter])

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        experts: torch.Tensor,
        act: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """This rank's share of the experts' weighted outputs, before the TP all-reduce.

        Args:
            x: (T, hidden) every token of the step.
            weights: (T, k) routing weight of each token's chosen experts.
            experts: (T, k) int64 ids of each token's chosen experts.
            act: gated activation, (n, 2 * inter) -> (n, inter).
        """
        k = experts.shape[1]
        flat = experts.reshape(-1)  # (T k,)
        order = flat.argsort(stable=True)  # (T k,) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // k  # (T k,) token of each sorted pair
        pair_weights = weights.reshape(-1)[order].unsqueeze(1)  # (T k, 1)
        out = torch.zeros_like(x)
        start = sum(counts[: self.first_expert])
        for local in range(self.num_local_experts):
            n = counts[self.first_expert + local]
            if n == 0:
                continue
            idx = tokens[start : start + n]  # (n,)
            h = act(F.linear(x[idx], self.w13[local]))  # (n, local inter)
            h = F.linear(h, self.w2[local]) * pair_weights[start : start + n]  # (n, hidden)
            out.index_add_(0, idx, h)
            start += n
        return out


class FusedMoE(nn.Module):
    """Router plus experts; ``(T, hidden) -> (T, hidden)`` summed over the TP group.

    Args:
        hidden_size: model width.
        intermediate_size: width of one expert's MLP.
        num_experts: experts per layer.
        top_k: experts each token is sent to.
        renormalize: rescale the top-k softmax weights to sum to 1 (Mixtral; Qwen3-MoE's
            ``norm_topk_prob``), else keep their share of the full softmax.
        act: gated activation of the experts.
        names: checkpoint names of an expert's gate, up and down projections.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        act: Callable[[torch.Tensor], torch.Tensor],
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ModelLoadError(f"num_experts_per_tok {top_k} must be in [1, {num_experts}]")
        self.top_k, self.renormalize, self.act = top_k, renormalize, act
        self.gate = Router(hidden_size, num_experts)
        self.experts = ExpertWeights(hidden_size, intermediate_size, num_experts, names)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, hidden) -> (weights (T, k) in x's dtype, expert ids (T, k)), softmax in float32."""
        probs = self.gate(x).float().softmax(dim=-1)  # (T, experts)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, hidden) -> (T, hidden), the same on every rank of the TP group."""
        weights, experts = self.route(x)
        return tp_all_reduce(self.experts(x, weights, experts, self.act))


class Router(nn.Module):
    """The replicated (experts, hidden) gate: every rank scores every expert."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)
        self.weight.weight_loader = load_replicated  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, hidden) -> (T, experts) router logits."""
        return F.linear(x, self.weight)
