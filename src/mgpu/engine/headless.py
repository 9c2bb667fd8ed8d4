"""``mgpu serve`` without an engine here: ``--dry-run`` (print the plan) and ``--node-rank R > 0``.

A node other than 0 hosts some ranks of the engine that node 0 runs: it resolves the same model
and layout from the same command line, starts its share of the ranks (``--nnodes`` splits them
evenly, contiguous) and waits for them; node 0 sends them steps over the control plane.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mgpu.config import CacheConfig, EngineArgs, ModelConfig, ParallelConfig, parse_dtype
from mgpu.engine.executor import LaunchConfig, WorkerSet, describe_exit, node_ranks
from mgpu.engine.placement import resolve_layout
from mgpu.errors import ConfigError
from mgpu.layers.quantization import quant_config_for, weight_format
from mgpu.memory import predicted_weight_bytes
from mgpu.models.loader import demo_model_path, resolve_model_path
from mgpu.models.registry import model_class


@dataclass(frozen=True)
class ResolvedPlan:
    """What a command line resolves to before any weight is read or any process started."""

    model_path: Path
    model_config: ModelConfig
    parallel_config: ParallelConfig
    device: str
    dtype: torch.dtype
    rank_memory_bytes: tuple[int, ...] | None = None
    #: The placement's line when it chose something other than what was asked (see
    #: :func:`mgpu.engine.placement.resolve_layout`).
    note: str | None = None
    quantization: str | None = None


def resolve(args: EngineArgs) -> ResolvedPlan:
    """Resolve the model directory, its config, the layout, the device and the dtype.

    Args:
        args: the engine settings.
    """
    return resolve_engine(
        args.model,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        layer_split=args.layer_split,
        placement=args.placement,
        device_memory=args.device_memory,
        device_speed=args.device_speed,
        enable_expert_parallel=args.enable_expert_parallel,
    )


def resolve_engine(
    model: str | Path | None,
    *,
    device: str | None,
    dtype: str,
    quantization: str | None,
    tensor_parallel_size: int | None,
    pipeline_parallel_size: int | None,
    layer_split: tuple[int, ...] | None,
    placement: str,
    device_memory: str | float | list | tuple | None,
    enable_expert_parallel: bool,
    device_speed: str | float | list | tuple | None = None,
) -> ResolvedPlan:
    """Everything a start decides before reading a weight or spawning a rank; the one place
    :class:`~mgpu.engine.llm_engine.LLMEngine`, ``--dry-run`` and headless nodes decide it.

    Args:
        model: a HF directory, hub id, GGUF file or Ollama name (None: the bundled demo).
        device: ``"cpu"``, ``"cuda"`` or None (cuda if present).
        dtype: ``auto`` or a dtype name.
        quantization: ``--quantization`` (None: as stored).
        tensor_parallel_size: ranks per layer, if given.
        pipeline_parallel_size: stages, if given.
        layer_split: layers per stage, if given.
        placement: ``"auto"`` or ``"manual"``.
        device_memory: CPU budgets (see :func:`mgpu.engine.placement.parse_device_memory`).
        enable_expert_parallel: whole experts per TP rank (MoE models).
        device_speed: relative device throughput (see
            :func:`mgpu.engine.placement.parse_device_speed`).

    The placement's line, when it chose something other than what was asked, is printed here.
    """
    path = resolve_model_path(model if model is not None else demo_model_path())
    if path.is_file():  # a GGUF file or Ollama blob, not a HF directory
        from mgpu.models.gguf import gguf_model_config

        config = gguf_model_config(path)
    else:
        config = ModelConfig.from_file(path)
    model_class(config)  # refuse an unsupported architecture before anything starts
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    quant_config_for(path, quantization)  # an unknown name or a format the model lacks fails here
    # Quantized weights run their fused kernels with bf16 activations; with fp32 activations they
    # take the dequantising path, which decoded 1.1-2.2x (int8) and 4-5x (int4) slower
    # whole-engine on CPU (docs/quantization.md, "Activations").
    auto = torch.bfloat16 if quantization else parse_dtype(config.torch_dtype)
    torch_dtype = parse_dtype(dtype, auto)
    placed = resolve_layout(
        config,
        torch.finfo(torch_dtype).bits // 8,
        device,
        tensor_parallel_size,
        pipeline_parallel_size,
        tuple(layer_split) if layer_split else None,
        placement,
        device_memory,
        device_speed,
    )
    parallel = placed.parallel_config
    if enable_expert_parallel:
        parallel = dataclasses.replace(parallel, enable_expert_parallel=True)
    parallel.check_model(config)
    if placed.note:
        print(f"mgpu: {placed.note}", flush=True)
    return ResolvedPlan(
        path,
        config,
        parallel,
        device,
        torch_dtype,
        placed.rank_memory_bytes,
        placed.note,
        quantization,
    )


def planned_ranks(plan: ResolvedPlan, nnodes: int = 1) -> list[dict[str, object]]:
    """One row per rank of the plan: rank, node, device, layers ``[start, end)``, predicted bytes.

    The bytes come from :func:`mgpu.memory.predicted_weight_bytes` at the storage of what is
    loaded (int8/int4 codes and scales, a GGUF file's block types), the formula's other user.

    Args:
        plan: the resolved command line.
        nnodes: machines the ranks are spread over.
    """
    pc, model = plan.parallel_config, plan.model_config
    tp, pp = pc.tensor_parallel_size, pc.pipeline_parallel_size
    fmt = weight_format(plan.model_path, plan.quantization, plan.dtype)
    per_node = pc.world_size // max(1, nnodes)
    rows = []
    for rank in range(pc.world_size):
        pp_rank = rank // tp
        layers = pc.layer_range(model, pp_rank)
        predicted = predicted_weight_bytes(
            model,
            fmt,
            tp,
            layers,
            pp_rank == 0,
            pp_rank == pp - 1,
            rank % tp,
            pc.enable_expert_parallel,
        )
        device = "cpu" if plan.device == "cpu" else f"cuda:{rank % per_node}"
        rows.append(
            {
                "rank": rank,
                "node": rank // per_node,
                "device": device,
                "layers": list(layers),
                "predicted_param_bytes": predicted,
            }
        )
    return rows


def served_names(
    served_model_name: str | None, model: str | None, model_path: Path
) -> tuple[str, tuple[str, ...]]:
    """The name the server gives the base model and the other names that reach it.

    Args:
        served_model_name: ``--served-model-name``, if given (default: the directory's name).
        model: ``--model`` as given.
        model_path: the resolved model.
    """
    name = served_model_name or model_path.name
    return name, tuple(a for a in (model, str(model_path)) if a and a != name)


def dry_run(args: EngineArgs, served_model_name: str | None = None) -> int:
    """Print the per-rank table ``mgpu serve`` would build; read no weights, start no process.

    The LoRA adapters go through the checks a start runs before its workers (the flags, each
    adapter's config and tensor shapes against the model, its name against the served model's),
    so a refusal is the one line a start would give.

    Args:
        args: the engine settings.
        served_model_name: ``--served-model-name``, if given.
    """
    from mgpu.lora.adapter import check_lora, check_served_names

    plan = resolve(args)
    model_name = args.model if args.model is not None else str(plan.model_path)
    lora_config, adapters = check_lora(
        plan.model_config,
        model_name,
        args.enable_lora,
        args.lora_modules,
        args.max_loras,
        args.max_lora_rank,
    )
    name, aliases = served_names(served_model_name, args.model, plan.model_path)
    check_served_names((a.name for a in adapters), (name, *aliases))
    pc = plan.parallel_config
    dtype = str(plan.dtype).removeprefix("torch.")
    print(
        f"mgpu serve --dry-run: {plan.model_path} ({plan.model_config.architecture}) on "
        f"{plan.device}, {dtype}, TP {pc.tensor_parallel_size} x PP {pc.pipeline_parallel_size}"
    )
    print(f"{'rank':>4} {'node':>4} {'device':<8} {'layers':<10} {'predicted params (MB)':>22}")
    for row in planned_ranks(plan, args.nnodes):
        start, end = row["layers"]  # type: ignore[misc]
        layers = f"[{start}, {end})"
        mb = row["predicted_param_bytes"] / 1e6  # type: ignore[operator]
        print(f"{row['rank']:>4} {row['node']:>4} {row['device']:<8} {layers:<10} {mb:>22.1f}")
    for info in adapters:
        print(
            f"LoRA adapter {info.name} ({info.path}): rank {info.rank}, {len(info.tensors)} "
            f"modules; request it as model '{info.name}'"
        )
    if lora_config is not None:
        print(f"LoRA slots per device: {lora_config.max_loras}, rank {lora_config.max_lora_rank}")
    ignored = args.ignored()
    if ignored:
        print(ignored)
    return 0


def run_headless(args: EngineArgs) -> int:
    """Host this node's ranks of an engine run by node 0; returns when they have all exited.

    Args:
        args: the engine settings (the same command line as node 0's).
    """
    if not args.master_port:
        raise ConfigError("--node-rank > 0 needs --master-port, the port node 0 listens on")
    plan = resolve(args)
    ranks = node_ranks(plan.parallel_config.world_size, args.nnodes, args.node_rank)
    launch = LaunchConfig(
        device_type=plan.device,
        dtype_name=str(plan.dtype).removeprefix("torch."),
        cache_config=CacheConfig(
            block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            rank_memory_bytes=plan.rank_memory_bytes,
            num_blocks_override=args.num_gpu_blocks_override,
        ),
        cpu_reserved_cores=args.cpu_reserved_cores,
        compile_decode=args.compile,
        nnodes=args.nnodes,
        master_addr=args.master_addr,
        master_port=args.master_port,
        max_steps_in_flight=plan.parallel_config.pipeline_parallel_size,
        quantization=args.quantization,
    )
    workers = WorkerSet(
        plan.model_path, plan.model_config, plan.parallel_config, launch, ranks, args.master_port
    )
    print(
        f"mgpu serve: node {args.node_rank} of {args.nnodes} runs ranks "
        f"{', '.join(map(str, ranks))} for {args.master_addr}:{args.master_port}",
        flush=True,
    )
    try:
        while (dead := workers.dead()) is None:
            time.sleep(0.2)
    finally:
        workers.stop(grace_s=1.0)
    rank, proc = dead
    code = proc.poll()
    print(f"mgpu serve: rank {rank} ended ({describe_exit(code)})", file=sys.stderr)
    return 0 if code == 0 else 1
