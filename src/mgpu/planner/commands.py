"""The command lines that run a plan: ``mgpu serve``, and the same layout in vLLM and llama.cpp.

``mgpu serve`` takes vLLM's flag names (DESIGN.md), so the two commands differ mainly in the
program name (mgpu reads a checkpoint's quantization from its own files and has no
``--quantization``); llama.cpp expresses a layer split with ``--tensor-split`` proportions and
tensor parallelism with its row split.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from mgpu.planner.engines import LAYER_SPLIT, PIPELINE, TENSOR, TENSOR_PIPELINE
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


def mgpu_command(inputs: CommandInputs) -> str:
    """``mgpu serve`` for the plan.

    Args:
        inputs: the plan's layout and sizes.
    """
    model = _gguf_ref(inputs) if inputs.fmt.family == "gguf" else _model_ref(inputs)
    parts = [
        "mgpu serve",
        f"--model {shlex.quote(model)}",
        f"--tensor-parallel-size {inputs.tp}",
        f"--pipeline-parallel-size {inputs.pp}",
    ]
    if inputs.pp > 1 and len(set(inputs.layer_split)) > 1:
        parts.append(f"--layer-split {','.join(map(str, inputs.layer_split))}")
    # A quantized checkpoint declares its own format; a float plan names the dtype it assumed.
    dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(inputs.fmt.name)
    if dtype:
        parts.append(f"--dtype {dtype}")
    parts += [
        f"--max-model-len {inputs.context}",
        f"--max-num-seqs {inputs.concurrency}",
        f"--gpu-memory-utilization {gpu_memory_utilization(inputs.memory_fraction):.2f}",
    ]
    return _visible(inputs) + " ".join(parts)


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
    if inputs.fmt.vllm_name:
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
    if inputs.strategy in (TENSOR, TENSOR_PIPELINE):
        parts += ["--split-mode row", f"--tensor-split {','.join(['1'] * world)}"]
    elif inputs.strategy in (PIPELINE, LAYER_SPLIT):
        parts += ["--split-mode layer", f"--tensor-split {','.join(map(str, inputs.layer_split))}"]
    if inputs.kv_cache_dtype in ("q8_0", "q4_0"):
        parts.append(f"-ctk {inputs.kv_cache_dtype} -ctv {inputs.kv_cache_dtype} -fa on")
    return prefix + _visible(inputs) + " ".join(parts)
