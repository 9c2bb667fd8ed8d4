"""Served adapters give peft's greedy text, alone and mixed in one batch, at TP 1 and 2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mgpu import LLM, SamplingParams
from mgpu.engine.llm_engine import UnknownAdapterError
from tests.lora.conftest import MAX_TOKENS, PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _llm(adapters: dict[str, Path], tp: int, pp: int = 1, **kwargs: object) -> LLM:
    modules = [f"{name}={path}" for name, path in adapters.items()]
    return LLM(
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        device="cpu",
        dtype="float32",
        max_model_len=64,
        enable_lora=True,
        lora_modules=modules,
        **kwargs,
    )


#: The engines the tests share, one per module each: name -> (tp, pp, max_loras).
ENGINES = {"tp1": (1, 1, 2), "tp2": (2, 1, 2), "pp2": (1, 2, 2), "tp1-one-slot": (1, 1, 1)}


@pytest.fixture(scope="module")
def llm(request: pytest.FixtureRequest, adapters: dict[str, Path]) -> Iterator[LLM]:
    """The engine :data:`ENGINES` names (an indirect parameter), serving both test adapters;
    started once for every test that names it."""
    tp, pp, max_loras = ENGINES[request.param]
    with _llm(adapters, tp, pp, max_loras=max_loras) as llm:
        yield llm


@pytest.mark.parametrize("llm", ["tp1", "tp2", "pp2"], indirect=True)
def test_adapter_matches_peft(
    llm: LLM, adapters: dict[str, Path], references: dict[str | None, list[list[int]]]
) -> None:
    """Each adapter alone, then the base model; with pipeline stages each holds its layers' part."""
    for name in [*adapters, None]:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=name)
        assert [list(o.outputs[0].token_ids) for o in outs] == references[name], name
    if llm.engine.parallel_config.world_size > 1:
        return
    with pytest.raises(UnknownAdapterError, match=r"no LoRA adapter named 'nope'.*all, qv"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request="nope")


@pytest.mark.parametrize("llm", ["tp1", "tp1-one-slot"], indirect=True)
def test_mixed_batch_gives_each_request_its_model(
    llm: LLM,
    adapters: dict[str, Path],
    references: dict[str | None, list[list[int]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two adapters and the base model in one batch (max_loras 2), or taking turns in one slot."""
    names: list[str | None] = [*adapters, None]
    assert len({str(references[n]) for n in names}) == len(names), "adapters must change the text"
    prompts = [p for p in PROMPTS for _ in names]
    loras = [n for _ in PROMPTS for n in names]
    executor, steps = llm.engine.executor, []
    submit = executor.submit

    def recording_submit(method: str, *args: Any, **kwargs: Any) -> int:
        if method == "execute":
            steps.append({chunk.lora_id for chunk in args[0].chunks})
        return submit(method, *args, **kwargs)

    monkeypatch.setattr(executor, "submit", recording_submit)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    # Adapter ids 1, 2 and the base model 0: together in one step, or never both adapters at once.
    assert llm.engine.lora_config is not None
    if llm.engine.lora_config.max_loras == 2:
        assert {0, 1, 2} in steps
    else:
        assert not any({1, 2} <= ids for ids in steps)
        assert {0, 1} in steps and any(2 in ids for ids in steps)
    for i, (out, name) in enumerate(zip(outs, loras, strict=True)):
        assert list(out.outputs[0].token_ids) == references[name][i // len(names)], name


@pytest.mark.gpu
def test_adapter_matches_peft_on_cuda(
    adapters: dict[str, Path], references: dict[str | None, list[list[int]]]
) -> None:
    """The same comparison on a GPU (float32), all three models in one batch."""
    names: list[str | None] = [*adapters, None]
    prompts = [p for p in PROMPTS for _ in names]
    loras = [n for _ in PROMPTS for n in names]
    with LLM(
        device="cuda",
        dtype="float32",
        max_model_len=64,
        enable_lora=True,
        max_loras=2,
        lora_modules=[f"{name}={path}" for name, path in adapters.items()],
    ) as llm:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    for i, (out, name) in enumerate(zip(outs, loras, strict=True)):
        assert list(out.outputs[0].token_ids) == references[name][i // len(names)], name
