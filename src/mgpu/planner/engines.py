"""What each inference engine can do, as far as planning needs to know.

The same GPUs run at very different speeds under different engines, and not every engine offers
every split. These profiles say which strategies and weight formats an engine has, how it
communicates under tensor parallelism, and what memory it keeps beyond weights and KV cache. The
speed constants themselves are calibrated from measurements (see :mod:`mgpu.planner.calibration`).

Memory overheads are estimates, not measurements, and are documented as such in docs/planner.md:
every engine pays a CUDA context (about 0.5 GiB with cuBLAS workspaces); engines that capture CUDA
graphs and keep NCCL buffers (vLLM, SGLang, TensorRT-LLM, LMDeploy, mgpu) are given 1 GiB more,
the others 0.3-0.5 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from mgpu.errors import ConfigError

SINGLE = "single"
TENSOR = "tensor_parallel"
PIPELINE = "pipeline_parallel"
LAYER_SPLIT = "layer_split"
TENSOR_PIPELINE = "tensor_pipeline_parallel"
#: Attention tensor-parallel, experts placed whole on the ranks and tokens dispatched to them with
#: all-to-all (vLLM's ``--enable-expert-parallel``); mixture-of-experts models only.
EXPERT = "expert_parallel"
STRATEGIES = (SINGLE, TENSOR, PIPELINE, LAYER_SPLIT, TENSOR_PIPELINE, EXPERT)

CUDA_CONTEXT_GIB = 0.5


@dataclass(frozen=True)
class EngineProfile:
    """Planning facts about one engine."""

    name: str
    strategies: tuple[str, ...]
    families: tuple[str, ...]
    row_split_tp: bool
    """Tensor parallelism splits each matrix's rows and gathers on the main GPU (llama.cpp's
    ``--split-mode row``) instead of Megatron-style all-reduces."""
    embedding_on_host: bool
    """The token embedding stays in host memory (llama.cpp keeps its input layer on the CPU)."""
    runtime_overhead_gib: float
    """Memory the engine keeps per GPU beyond the CUDA context (estimate)."""
    prefill_chunk_tokens: int
    """Prompt tokens per forward pass (llama.cpp's default micro-batch is 512)."""

    @property
    def overhead_gib(self) -> float:
        """Memory per device besides weights, KV cache and activations."""
        return CUDA_CONTEXT_GIB + self.runtime_overhead_gib

    @property
    def split_strategy(self) -> str:
        """What splitting the layers over GPUs means here: a pipeline with overlapping micro-batches
        (vLLM, mgpu) or a sequential layer split (llama.cpp, ExLlama)."""
        return PIPELINE if PIPELINE in self.strategies else LAYER_SPLIT


_SERVING = ("float", "fp8", "int8", "int4")
_ALL_SPLITS = (SINGLE, TENSOR, PIPELINE, TENSOR_PIPELINE)
_WITH_EXPERTS = (*_ALL_SPLITS, EXPERT)


def _engine(
    name: str,
    strategies: tuple[str, ...],
    families: tuple[str, ...],
    *,
    runtime_overhead_gib: float = 1.0,
    llama_cpp_style: bool = False,
) -> EngineProfile:
    """A profile; llama.cpp-style engines row-split for TP, keep the embedding on the host and
    prefill 512 tokens at a time."""
    return EngineProfile(
        name=name,
        strategies=strategies,
        families=families,
        row_split_tp=llama_cpp_style,
        embedding_on_host=llama_cpp_style,
        runtime_overhead_gib=runtime_overhead_gib,
        prefill_chunk_tokens=512 if llama_cpp_style else 2048,
    )


_LLAMA_CPP = ((SINGLE, LAYER_SPLIT, TENSOR), ("float", "gguf"))
ENGINES: dict[str, EngineProfile] = {
    e.name: e
    for e in (
        _engine("mgpu", _WITH_EXPERTS, (*_SERVING, "gguf")),
        _engine("vllm", _WITH_EXPERTS, (*_SERVING, "gguf")),
        _engine("sglang", _WITH_EXPERTS, _SERVING),
        _engine("tensorrt-llm", _WITH_EXPERTS, _SERVING),
        _engine("lmdeploy", (SINGLE, TENSOR), _SERVING),
        _engine("gpt-fast", (SINGLE, TENSOR), ("float", "int8", "int4"), runtime_overhead_gib=0.5),
        _engine("mlc-llm", (SINGLE, TENSOR), ("float", "int8", "int4"), runtime_overhead_gib=0.5),
        _engine(
            "exllamav2", (SINGLE, LAYER_SPLIT, TENSOR), ("exl2", "int4"), runtime_overhead_gib=0.3
        ),
        _engine("exllama", (SINGLE, LAYER_SPLIT), ("int4",), runtime_overhead_gib=0.3),
        _engine("llama.cpp", *_LLAMA_CPP, runtime_overhead_gib=0.3, llama_cpp_style=True),
        _engine("ik_llama.cpp", *_LLAMA_CPP, runtime_overhead_gib=0.3, llama_cpp_style=True),
    )
}

#: Engines without measurements of their own that borrow another engine's calibration.
CALIBRATION_PARENT = {"ik_llama.cpp": "llama.cpp"}


def get_engine(name: str) -> EngineProfile:
    """Look up ``--engine``.

    Args:
        name: an engine name (case-insensitive; ``llamacpp`` and ``trt-llm`` are accepted).

    Raises:
        ConfigError: for an unknown engine.
    """
    key = name.strip().lower()
    key = {
        "llamacpp": "llama.cpp",
        "llama-cpp": "llama.cpp",
        "llama_cpp": "llama.cpp",
        "ik-llama.cpp": "ik_llama.cpp",
        "trt-llm": "tensorrt-llm",
        "trtllm": "tensorrt-llm",
        "tensorrt_llm": "tensorrt-llm",
        "exllamav1": "exllama",
        "mlc": "mlc-llm",
        "mlc_llm": "mlc-llm",
        "gpt_fast": "gpt-fast",
    }.get(key, key)
    if key not in ENGINES:
        raise ConfigError(f"unknown --engine {name!r}; use one of {', '.join(ENGINES)}")
    return ENGINES[key]
