"""The command lines that run a plan: ``mgpu serve``, and the same layout in vLLM and llama.cpp.

``mgpu serve`` takes vLLM's flag names (DESIGN.md), so the two commands differ mainly in the
program name; llama.cpp expresses a layer split with ``--tensor-split`` proportions and tensor
parallelism with its row split.

An ``mgpu serve`` command is printed only for what the engine runs, and what it runs is read from
the engine itself rather than kept in a list here: the architecture from
:data:`mgpu.models.registry.MODEL_REGISTRY` (through ``model_class``), a quantization or a GGUF file
from the choices of the :class:`~mgpu.config.EngineArgs` field ``quantization`` and the KV-cache
type from those of ``kv_cache_dtype``. Anything else gets a comment saying why, beside the vLLM and
llama.cpp commands.

The command itself is an :class:`~mgpu.config.EngineArgs` written out by
:meth:`~mgpu.config.EngineArgs.to_cli_args`, the same fields and flags ``mgpu serve`` parses, so a
renamed setting cannot leave a stale flag in a printed command.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass
from functools import cache

from mgpu.config import EngineArgs
from mgpu.planner.engines import EXPERT, LAYER_SPLIT, PIPELINE, TENSOR, TENSOR_PIPELINE
from mgpu.planner.models import ModelSpec
from mgpu.planner.quant import QuantFormat


@dataclass(frozen=True)
class CommandInputs:
    """What the commands need from a plan."""

    model: ModelSpec
    fmt: QuantFormat
    strategy: str
    tp: int
    pp: int
    layer_split: tuple[int, ...]
    device_indices: tuple[int, ...]
    all_devices: int
    context: int
    concurrency: int
    kv_cache_dtype: str
    memory_fraction: float
    fits: bool = True


def gpu_memory_utilization(memory_fraction: float) -> float:
    """The ``--gpu-memory-utilization`` that leaves the plan's memory to the engine.

    vLLM and mgpu give the KV cache what remains of ``utilization x memory``; 0.90 is their default
    and is kept unless the plan needs more of the GPU.

    Args:
        memory_fraction: the plan's share of its fullest GPU.
    """
    return min(0.98, max(0.90, math.ceil(memory_fraction * 100 + 1) / 100))


def _model_ref(inputs: CommandInputs) -> str:
    if inputs.model.path:
        return inputs.model.path
    return inputs.model.hf_id or inputs.model.name


def _gguf_ref(inputs: CommandInputs) -> str:
    if inputs.model.is_gguf_file and inputs.model.path:
        return inputs.model.path
    tag = inputs.fmt.name.upper() if inputs.fmt.is_gguf else "Q4_K_M"
    return f"{inputs.model.name}-{tag}.gguf"


def _visible(inputs: CommandInputs) -> str:
    indices = inputs.device_indices
    if indices == tuple(range(inputs.all_devices)):
        return ""
    return f"CUDA_VISIBLE_DEVICES={','.join(map(str, indices))} "


@cache
def _serve_options() -> dict[str, tuple[str, ...] | None]:
    """``mgpu serve``'s engine settings and their choices (None: any value), from
    :class:`~mgpu.config.EngineArgs`."""
    return {
        f.name: tuple(f.metadata["choices"]) if f.metadata.get("choices") else None
        for f in dataclasses.fields(EngineArgs)
    }


def _accepted(name: str, value: str) -> bool:
    """Whether ``mgpu serve`` lists ``value`` among the choices of setting ``name``."""
    choices = _serve_options().get(name)
    return choices is not None and value in choices


def _is_quantized(inputs: CommandInputs) -> bool:
    """Whether the weights are anything but a float Hugging Face checkpoint."""
    return inputs.fmt.family != "float" or inputs.model.is_gguf_file


def _serve_quantization(inputs: CommandInputs) -> str | None:
    """The ``--quantization`` value ``mgpu serve`` takes for this plan's weights, if any."""
    fmt = inputs.fmt
    if not _is_quantized(inputs):
        return None
    wanted: list[str] = []
    if fmt.family == "gguf" or inputs.model.is_gguf_file:
        from mgpu.layers.quantization.gguf import FILE_TYPES

        if fmt.name not in FILE_TYPES:
            return None  # a GGUF type the engine does not decode
        wanted = ["gguf", fmt.name]
    wanted += [name for name in (fmt.vllm_name, fmt.name) if name]
    return next((name for name in wanted if _accepted("quantization", name)), None)


def mgpu_refusal(inputs: CommandInputs) -> str | None:
    """Why ``mgpu serve`` cannot run this plan, or None when it can.

    Args:
        inputs: the plan's model, precision and layout.
    """
    from mgpu.errors import MgpuError
    from mgpu.models.registry import model_class

    if not inputs.fits:
        return "the plan does not fit these GPUs, and the engine would refuse its KV cache"
    try:
        model_class(inputs.model.config)
    except MgpuError as exc:
        return f"the engine does not run this model ({exc})"
    fmt = inputs.fmt
    if _is_quantized(inputs) and _serve_quantization(inputs) is None:
        if inputs.model.is_gguf_file or fmt.family == "gguf":
            from mgpu.layers.quantization.gguf import FILE_TYPES

            return (
                f"the engine does not decode GGUF {fmt.name} files yet (it reads "
                f"{', '.join(FILE_TYPES)})"
            )
        return (
            f"the engine does not load {fmt.name} yet (mgpu serve --quantization does not offer it)"
        )
    if inputs.strategy == EXPERT and "enable_expert_parallel" not in _serve_options():
        return "the engine has no expert parallelism (mgpu serve has no --enable-expert-parallel)"
    kv = inputs.kv_cache_dtype
    if kv not in ("auto", "f16", "bf16") and not _accepted("kv_cache_dtype", kv):
        return f"the engine has no {kv} KV cache (mgpu serve --kv-cache-dtype does not offer it)"
    return None


def mgpu_command(inputs: CommandInputs) -> str:
    """``mgpu serve`` for the plan, or a comment saying why the engine cannot run it.

    Args:
        inputs: the plan's layout and sizes.
    """
    refusal = mgpu_refusal(inputs)
    if refusal is not None:
        return f"# no mgpu serve command: {refusal}; use the vLLM or llama.cpp command"
    if inputs.model.ollama_pull and inputs.fmt.name == inputs.model.implied_quantization:
        model = inputs.model.ollama_pull  # the engine resolves it to the blob Ollama holds
    elif inputs.fmt.family == "gguf":
        model = _gguf_ref(inputs)
    else:
        model = _model_ref(inputs)
    split = inputs.pp > 1 and len(set(inputs.layer_split)) > 1
    quantization = _serve_quantization(inputs)
    kv = inputs.kv_cache_dtype
    args = EngineArgs(
        model=model,
        tensor_parallel_size=inputs.tp,
        pipeline_parallel_size=inputs.pp,
        layer_split=inputs.layer_split if split else None,
        enable_expert_parallel=inputs.strategy == EXPERT,
        quantization=quantization,
        # A float plan names the dtype it assumed.
        dtype="auto" if quantization else _FLOAT_DTYPES[inputs.fmt.name],
        max_model_len=inputs.context,
        max_num_seqs=inputs.concurrency,
        gpu_memory_utilization=gpu_memory_utilization(inputs.memory_fraction),
        kv_cache_dtype="auto" if kv in ("auto", "f16", "bf16") else kv,
    )
    # The plan's memory share is written even at the default, so the reader sees it.
    argv = args.to_cli_args(include=("gpu_memory_utilization",))
    return _visible(inputs) + shlex.join(["mgpu", "serve", *argv])


#: The ``--dtype`` of a float plan's precision.
_FLOAT_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def vllm_command(inputs: CommandInputs) -> str:
    """The same layout in vLLM (``vllm serve``).

    Args:
        inputs: the plan's layout and sizes.
    """
    if inputs.fmt.family == "exl2":
        return "# vLLM cannot load EXL2 weights: use a GPTQ/AWQ or fp8 checkpoint of the model"
    env = _visible(inputs)
    # vLLM splits layers evenly unless told otherwise through this variable.
    if inputs.pp > 1 and len(set(inputs.layer_split)) > 1:
        env += f"VLLM_PP_LAYER_PARTITION={','.join(map(str, inputs.layer_split))} "
    if inputs.fmt.family == "gguf":
        model = f"{shlex.quote(_gguf_ref(inputs))} --tokenizer {inputs.model.hf_id or '<hf-repo>'}"
    else:
        model = shlex.quote(_model_ref(inputs))
    parts = [
        f"vllm serve {model}",
        f"--tensor-parallel-size {inputs.tp}",
        f"--pipeline-parallel-size {inputs.pp}",
    ]
    if inputs.strategy == EXPERT:
        parts.append("--enable-expert-parallel")
    if inputs.fmt.family == "gguf" or inputs.model.is_gguf_file:
        parts.append("--quantization gguf")
    elif inputs.fmt.vllm_name:
        parts.append(f"--quantization {inputs.fmt.vllm_name}")
    parts += [
        f"--max-model-len {inputs.context}",
        f"--max-num-seqs {inputs.concurrency}",
        f"--gpu-memory-utilization {gpu_memory_utilization(inputs.memory_fraction):.2f}",
    ]
    if inputs.kv_cache_dtype == "fp8":
        parts.append("--kv-cache-dtype fp8")
    return env + " ".join(parts)


def llama_cpp_command(inputs: CommandInputs) -> str:
    """The same layout in llama.cpp (``llama-server``).

    Args:
        inputs: the plan's layout and sizes.
    """
    prefix = ""
    if not inputs.fmt.is_gguf:
        prefix = (
            f"# llama.cpp runs GGUF files only; convert ({inputs.fmt.name} has no GGUF form) with "
            "convert_hf_to_gguf.py and llama-quantize, e.g. to Q4_K_M, then:\n"
        )
    parts = [
        f"llama-server -m {shlex.quote(_gguf_ref(inputs))}",
        "-ngl 999",
        # -c is the total over all slots; each of -np slots gets -c / -np tokens.
        f"-c {inputs.context * inputs.concurrency}",
        f"-np {inputs.concurrency}",
    ]
    world = inputs.tp * inputs.pp
    if inputs.strategy == EXPERT:
        prefix += "# llama.cpp has no expert parallelism; its row split over the same GPUs:\n"
    if inputs.strategy in (TENSOR, TENSOR_PIPELINE, EXPERT):
        parts += ["--split-mode row", f"--tensor-split {','.join(['1'] * world)}"]
    elif inputs.strategy in (PIPELINE, LAYER_SPLIT):
        parts += ["--split-mode layer", f"--tensor-split {','.join(map(str, inputs.layer_split))}"]
    if inputs.kv_cache_dtype in ("q8_0", "q4_0"):
        parts.append(f"-ctk {inputs.kv_cache_dtype} -ctv {inputs.kv_cache_dtype} -fa on")
    return prefix + _visible(inputs) + " ".join(parts)
