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

Quantization (``--quantization int8|int4``) reaches the experts through the same seam as the
parallel linears: built inside a :func:`~mgpu.layers.quantization.quantization_scope` with a
weight-only config, each expert's gate/up rows and down columns are quantized slice by slice as
the loader hands them over (never a float copy of the stacked experts), fused into one int8/int4
weight per expert and projection after loading, and multiplied by the same kernels
(``layers.quantization.weights``). The router stays in the model dtype, as in vLLM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mgpu.distributed import parallel_state as ps
from mgpu.distributed.communication import tp_all_reduce
from mgpu.errors import ModelLoadError
from mgpu.layers.linear import LazyTensor, _copy, check_shape, load_replicated
from mgpu.layers.matmul import dense_linear
from mgpu.layers.quantization.base import current_quant_config
from mgpu.layers.quantization.method import WeightOnlyConfig, part_to_device
from mgpu.layers.quantization.weights import PackedWeight, concat_rows
from mgpu.memory import int4_group_for

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
        config = current_quant_config()
        #: The weight-only quantization of the experts (None: float in the model dtype).
        self.quant = config if isinstance(config, WeightOnlyConfig) and config.bits else None
        # Quantized experts fill per-expert packed weights; the stacked float parameters are
        # storage-free placeholders that carry the checkpoint names and loaders.
        device = "meta" if self.quant is not None else None
        self.w13 = nn.Parameter(
            torch.empty(local, 2 * self.local_inter, hidden_size, device=device),
            requires_grad=False,
        )
        self.w2 = nn.Parameter(
            torch.empty(local, hidden_size, self.local_inter, device=device), requires_grad=False
        )
        self.quant_device, self.quant_dtype = torch.empty(0).device, torch.get_default_dtype()
        self._parts: dict[tuple[int, int], PackedWeight] = {}  # (expert, 0 gate/1 up/2 down)
        self.packed_w13: list[PackedWeight] = []  # per local expert, (2 local inter, hidden)
        self.packed_w2: list[PackedWeight] = []  # per local expert, (hidden, local inter)
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
        if self.quant is not None:
            self._store(expert, part, loaded[start : start + rows])
            return
        _copy(param[expert, part * rows : (part + 1) * rows], loaded[start : start + rows])

    def _load_w2(self, param: nn.Parameter, loaded: LazyTensor, shard: tuple[int, None]) -> None:
        """This rank's columns of one expert's (hidden, inter) down projection."""
        check_shape(loaded, (self.hidden_size, self.intermediate_size), param.checkpoint_name)  # type: ignore[attr-defined]
        start = self.slice_rank * self.local_inter
        if self.quant is not None:
            self._store(shard[0], 2, loaded[:, start : start + self.local_inter])
            return
        _copy(param[shard[0]], loaded[:, start : start + self.local_inter])

    def _store(self, expert: int, part: int, w: torch.Tensor) -> None:
        """Quantize one float slice at once: (local inter, hidden) gate/up, (hidden, inter) down."""
        assert self.quant is not None
        group = int4_group_for(w.shape[1], self.quant.group_size)
        with torch.no_grad():
            packed = self.quant.quantize(w, group)
        self._parts[(expert, part)] = part_to_device(packed, self.quant_device)

    def process_weights_after_loading(self) -> None:
        """Fuse each expert's quantized gate and up, repack for the kernels, register them."""
        if self.quant is None:
            return
        local = self.num_local_experts
        missing = [
            k for k in ((e, p) for e in range(local) for p in range(3)) if k not in self._parts
        ]
        if missing:
            raise ModelLoadError(f"experts {sorted({e for e, _ in missing})} were never loaded")
        del self.w13, self.w2
        for e in range(local):
            fused = concat_rows([self._parts[(e, 0)], self._parts[(e, 1)]])
            assert fused is not None  # both halves come from one quantizer
            self.packed_w13.append(fused)
            self.packed_w2.append(self._parts[(e, 2)])
            for name, part in (("w13", fused), ("w2", self._parts[(e, 2)])):
                self.quant.finalize(part, self.quant_dtype)
                for key, tensor in part.tensors().items():
                    param = nn.Parameter(tensor, requires_grad=False)
                    self.register_parameter(f"e{e}_{name}_{key}", param)
        self._parts = {}

    def _expert_matmuls(self, local: int, x: torch.Tensor, act: Callable) -> torch.Tensor:
        """(n, hidden) -> (n, hidden) through local expert ``local``'s gate/up and down."""
        if self.quant is None:
            return dense_linear(act(dense_linear(x, self.w13[local])), self.w2[local])
        use_kernel = self.quant.use_kernel
        h = act(self.packed_w13[local].matmul(x, use_kernel))  # (n, local inter)
        return self.packed_w2[local].matmul(h, use_kernel)

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
            h = self._expert_matmuls(local, x[idx], act) * pair_weights[start : start + n]  # (n, h)
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
        return dense_linear(x, self.weight)
