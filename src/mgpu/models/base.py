"""What every decoder-only architecture shares: the pipeline stage and its checkpoint names.

A family subclasses :class:`CausalLM` and declares, as data on the class, the HF architecture names
it implements, its packed modules and how to build decoder layer ``i``; the registry reads the
names and the loader asks the model which checkpoint tensors it needs (``checkpoint_names``) and
which a complete checkpoint may hold (``all_checkpoint_names``). Adding a family edits neither.

Every model has the same constructor ``(config, layer_range, is_first_stage, is_last_stage)`` and
the same forward ``(input_ids, positions, meta, hidden, residual) -> (hidden, residual)``: a
pipeline stage builds only its layer range (STYLE.md convention 8); the first stage embeds tokens,
the last applies the final norm and the LM head. A decoder layer is called as
``layer(rope, hidden, residual, meta)`` and says in ``attention_type`` which RoPE table and which
attention mask it takes (``sliding_attention`` or ``full_attention``), so models whose layers
alternate between a sliding window and global attention (Gemma) need nothing from the runner.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mgpu.config import ModelConfig
from mgpu.layers.attention import AttentionMetadata, window_metadata
from mgpu.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mgpu.layers.moe import expert_parallel
from mgpu.layers.norm import RMSNorm
from mgpu.layers.rotary import RotaryEmbedding

#: (cos, sin) of RoPE for the step's tokens, each (T, 1, head_dim), shared by all layers.
Rope = tuple[torch.Tensor, torch.Tensor]

#: HF checkpoint names fused into one local parameter: local module -> [(HF module, shard id)].
PackedModules = dict[str, list[tuple[str, int]]]

#: Checkpoint tensor name -> (local parameter, shard id passed to its ``weight_loader``).
CheckpointNames = dict[str, tuple[nn.Parameter, object]]


class CausalLM(nn.Module):
    """A pipeline stage of a decoder-only causal LM on one rank.

    Args:
        config: the architecture.
        layer_range: ``[start, end)`` decoder layers this stage holds (all when None).
        is_first_stage: holds the embedding and takes token ids.
        is_last_stage: holds the final norm and the LM head and produces logits.
    """

    #: HF ``architectures`` names this class implements (the registry is built from these).
    architectures: ClassVar[tuple[str, ...]] = ()
    #: Fused local parameters and the checkpoint tensors each is filled from.
    packed_modules: ClassVar[PackedModules] = {
        "qkv_proj": [("q_proj", 0), ("k_proj", 1), ("v_proj", 2)],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }
    #: The final norm (Gemma's adds one to its weight).
    norm_class: ClassVar[type[RMSNorm]] = RMSNorm

    @classmethod
    def make_layer(cls, config: ModelConfig, layer: int) -> nn.Module:
        """Decoder layer number ``layer`` (global index) of this family."""
        raise NotImplementedError(f"{cls.__name__} does not say how to build its layers")

    def __init__(
        self,
        config: ModelConfig,
        layer_range: tuple[int, int] | None = None,
        is_first_stage: bool = True,
        is_last_stage: bool = True,
    ):
        super().__init__()
        self.config = config
        self.start_layer, self.end_layer = layer_range or (0, config.num_hidden_layers)
        self.is_first_stage, self.is_last_stage = is_first_stage, is_last_stage
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size)
            if is_first_stage
            else None
        )
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        # Gemma 3's sliding layers rotate with their own base and no scaling.
        self.rotary_emb_local = (
            RotaryEmbedding(
                config.head_dim, config.max_position_embeddings, config.rope_local_theta, None
            )
            if config.rope_local_theta is not None
            else None
        )
        layers = range(self.start_layer, self.end_layer)
        self.layers = nn.ModuleList(self.make_layer(config, i) for i in layers)
        #: Window width of each attention type among this stage's layers.
        self.windows = {config.attention_type(i): config.layer_window(i) for i in layers}
        self.norm = (
            self.norm_class(config.hidden_size, config.rms_norm_eps) if is_last_stage else None
        )
        self.lm_head = None
        if is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
            if config.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight
                self.lm_head.tied = True

    # ---- forward ------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, h) input of the first layer."""
        assert self.embed_tokens is not None
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run this stage's layers.

        Args:
            input_ids: (T,) token ids (used by the first stage).
            positions: (T,) absolute positions.
            meta: attention metadata of the step.
            hidden, residual: (T, h) from the previous stage (later stages only).

        Returns:
            (hidden, residual): on the last stage ``hidden`` is final-normed and residual is None.
        """
        if self.embed_tokens is not None:
            hidden = self.embed(input_ids)  # (T, h)
        assert hidden is not None, "a later pipeline stage needs the previous stage's hidden states"
        rope = self.rotary_emb(positions, hidden.dtype)
        local = self.rotary_emb_local(positions, hidden.dtype) if self.rotary_emb_local else rope
        ropes = {"full_attention": rope, "sliding_attention": local}
        # The runner's decode mask has the config's sliding window; layers without one (Gemma's
        # global layers) get their own mask, built once per step.
        metas = {
            kind: meta
            if window == self.config.sliding_window
            else window_metadata(meta, positions, window)
            for kind, window in self.windows.items()
        }
        for layer in self.layers:
            kind = layer.attention_type
            hidden, residual = layer(ropes[kind], hidden, residual, metas[kind])
        if self.norm is not None:
            hidden, _ = self.norm(hidden, residual)
            residual = None
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, h) final hidden states -> (N, vocab) float32 logits on TP rank 0, None elsewhere."""
        assert self.lm_head is not None, "only the last pipeline stage computes logits"
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if logits is not None and cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- checkpoint names ---------------------------------------------------------------------

    def checkpoint_names(self) -> CheckpointNames:
        """Every HF checkpoint tensor this rank needs: HF name -> (local parameter, shard id).

        A tied LM head on the embedding's stage is the embedding parameter itself, so
        ``named_parameters`` lists it once; on a later stage it reads ``model.embed_tokens.weight``.
        """
        names: CheckpointNames = {}
        for local_name, param in self.named_parameters():
            names.update(self._expand(self._hf_name(local_name), param))
        return names

    @classmethod
    def all_checkpoint_names(cls, config: ModelConfig) -> set[str]:
        """Every tensor name a complete HF checkpoint of ``config`` may hold (for strict loading).

        Each layer is built on the meta device (no memory) with every expert present, and its
        parameters' names expanded as ``checkpoint_names`` expands them.
        """
        names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        with torch.device("meta"), expert_parallel(False):
            for i in range(config.num_hidden_layers):
                for local_name, param in cls.make_layer(config, i).named_parameters():
                    names.update(cls._expand(f"model.layers.{i}.{local_name}", param))
        return names

    @classmethod
    def _expand(cls, hf_name: str, param: nn.Parameter) -> CheckpointNames:
        """The checkpoint tensors filling ``param``, whose unpacked name is ``hf_name``."""
        module, leaf = hf_name.rsplit(".", 1)
        hf_names = getattr(param, "hf_names", None)
        if hf_names is not None:  # stacked experts: one tensor per expert and projection
            return {f"{module}.{name}": (param, shard) for name, shard in hf_names}
        prefix, _, module_name = module.rpartition(".")
        parts = cls.packed_modules.get(module_name, [(module_name, None)])
        return {
            f"{prefix}.{part}.{leaf}" if prefix else f"{part}.{leaf}": (param, shard)
            for part, shard in parts
        }

    def _hf_name(self, local_name: str) -> str:
        if local_name.startswith("lm_head."):
            if self.config.tie_word_embeddings and self.embed_tokens is None:
                return "model.embed_tokens.weight"
            return local_name
        if local_name.startswith("layers."):
            _, idx, rest = local_name.split(".", 2)
            return f"model.layers.{int(idx) + self.start_layer}.{rest}"
        return f"model.{local_name}"
