"""The offline API, shaped like vLLM's ``LLM`` so users can switch without relearning."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mgpu.config import EngineArgs
from mgpu.engine.llm_engine import LLMEngine, RequestOutput
from mgpu.errors import ConfigError
from mgpu.sampling import SamplingParams

PromptInput = str | list[int] | dict[str, Any]
#: A served adapter's name, an object with a ``lora_name`` (vLLM's ``LoRARequest``), or None.
LoRARequestInput = str | Any | None


class LLM:
    """Generate text from a model split over several worker processes.

    Args:
        model: HF model directory or hub id (default: the bundled demo model).
        tensor_parallel_size: ranks each layer is split over (default: automatic placement).
        pipeline_parallel_size: pipeline stages (default: automatic placement).
        device: ``"cpu"`` or ``"cuda"`` (default: cuda when present).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        **kwargs: further :class:`~mgpu.config.EngineArgs` fields (``max_model_len``,
            ``max_num_seqs``, ``gpu_memory_utilization``, ...), the same settings as the CLI's.

    Use as a context manager, or call :meth:`shutdown`, to stop the workers.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        tensor_parallel_size: int | None = None,
        pipeline_parallel_size: int | None = None,
        device: str | None = None,
        dtype: str = "auto",
        **kwargs: Any,
    ):
        args = EngineArgs(
            model=None if model is None else str(model),
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            device=device,
            dtype=dtype,
            **_engine_arg_names(kwargs),
        )
        self.engine = LLMEngine.from_engine_args(args)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer."""
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | SequenceABC[PromptInput],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequestInput | SequenceABC[LoRARequestInput] = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of the prompts.

        Args:
            prompts: a string, a list of strings, token-id lists, or ``{"prompt_token_ids":
            [...]}``.
            sampling_params: one for all prompts, or one per prompt (default: greedy-free defaults).
            use_tqdm: show a progress bar.
            lora_request: the served LoRA adapter to run with (its ``--lora-modules`` name, or an
                object with a ``lora_name`` such as vLLM's ``LoRARequest``), one for all prompts
                or one per prompt; None is the base model.
        """
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, SequenceABC) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError("give one SamplingParams, or exactly one per prompt")
        if isinstance(lora_request, list | tuple):
            loras = [_lora_name(r) for r in lora_request]
            if len(loras) != len(prompts):
                raise ValueError("give one lora_request, or exactly one per prompt")
        else:
            loras = [_lora_name(lora_request)] * len(prompts)
        order = []
        try:
            for prompt, p, lora in zip(prompts, per_prompt, loras, strict=True):
                rid = str(next(self._ids))
                text, ids = _split_prompt(prompt)
                self.engine.add_request(rid, text, p, prompt_token_ids=ids, lora_request=lora)
                order.append(rid)
            done: dict[str, RequestOutput] = {}
            with tqdm(total=len(order), desc="generating", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        return [done[rid] for rid in order]

    def chat(
        self,
        messages: list[dict[str, str]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> RequestOutput:
        """Answer one conversation using the tokenizer's chat template."""
        ids = self.engine.chat_prompt_ids(messages)
        return self.generate([{"prompt_token_ids": ids}], sampling_params, use_tqdm)[0]

    def prompt_logits(self, prompt: str | list[int]) -> torch.Tensor:
        """(T, vocab) float32 logits at every position of one prompt."""
        ids = self.engine.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return self.engine.prompt_logits(ids)

    def layout(self) -> list[dict[str, Any]]:
        """One row per rank (rank, node, device, layers, param_bytes, predicted_param_bytes,
        kv_blocks): what the engine built, beside what the planner predicted."""
        return self.engine.layout()

    def shutdown(self) -> None:
        """Stop the worker processes."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _lora_name(request: LoRARequestInput) -> str | None:
    if request is None or isinstance(request, str):
        return request
    name = getattr(request, "lora_name", None)
    if not isinstance(name, str):
        raise ValueError(
            f"lora_request must be an adapter name or have a lora_name, got {request!r}"
        )
    return name


def _split_prompt(prompt: PromptInput) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        return prompt["prompt"], None
    return None, list(prompt)


#: ``LLM`` keywords kept from before :class:`EngineArgs`, and the field each one names.
_ALIASES = {"num_blocks": "num_gpu_blocks_override", "compile_decode": "compile"}


def _engine_arg_names(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` under their :class:`EngineArgs` names; an unknown keyword is a clear error."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    out = {}
    for key, value in kwargs.items():
        name = _ALIASES.get(key, key)
        if name not in fields:
            raise ConfigError(f"LLM() got an unknown setting {key!r}")
        out[name] = value
    return out
