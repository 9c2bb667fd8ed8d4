"""The LLM engine: tokenizer, scheduler and block manager in this process; model shards in workers.

``add_request`` queues work, ``step`` runs one forward pass of the running batch and returns what
changed, ``abort_request`` stops a request and frees its blocks. The offline :class:`~mgpu.LLM` and
the HTTP server are both thin loops around these three calls.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mgpu.config import (
    CacheConfig,
    EngineArgs,
    SchedulerConfig,
    blocks_for_tokens,
)
from mgpu.engine.block_manager import BlockManager
from mgpu.engine.cuda_graph import GRAPH_SHAPED_ENV, MAX_GRAPH_KEYS, GraphReport
from mgpu.engine.detokenizer import detokenize_incrementally
from mgpu.engine.executor import Executor, LaunchConfig
from mgpu.engine.headless import resolve_engine
from mgpu.engine.messages import DEFERRED_TOKEN, SeqChunk, StepInput
from mgpu.engine.model_runner import RankReport
from mgpu.engine.scheduler import ScheduledSeq, Scheduler
from mgpu.engine.sequence import Sequence
from mgpu.errors import ConfigError, MgpuError
from mgpu.layers import cpu_kernels
from mgpu.lora.adapter import AdapterInfo, LoRAConfig, LoRAModule, check_lora
from mgpu.lora.slots import SlotTable
from mgpu.memory import padded_vocab_size
from mgpu.models.loader import resolve_model_path, safetensors_files
from mgpu.sampling import SampleResult, SamplingParams

logger = logging.getLogger("mgpu.engine")


class PromptError(MgpuError, ValueError):
    """A prompt the engine cannot run (empty, too long for the context, unknown token ids)."""


class UnknownAdapterError(PromptError):
    """A request names a LoRA adapter the engine does not serve."""


@dataclass
class CompletionOutput:
    """One completion of a request (vLLM's shape)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[SampleResult] | None
    finish_reason: str | None
    stop_reason: int | str | None

    @property
    def finished(self) -> bool:
        """Whether this completion has stopped."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative text and tokens of each completion."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float = 0.0
    first_token_time: float | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float
    first_token_time: float | None = None
    stop_holdback: int = 0


@dataclass
class EngineStats:
    """Counters and gauges for /metrics and the monitor."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    recomputed_tokens_total: int = 0
    # Prefix cache, in prompt tokens as vLLM counts it: looked up at admission, and found cached.
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class LLMEngine:
    """Runs one model split over ``tensor_parallel_size x pipeline_parallel_size`` worker processes.

    Args:
        model: a HF model directory or hub id (default: the bundled demo model).
        tensor_parallel_size: ranks each layer is split over.
        pipeline_parallel_size: pipeline stages (contiguous layer ranges).
        layer_split: layers per stage, e.g. ``(10, 6)``; even when None.
        enable_expert_parallel: MoE models: whole experts per TP rank instead of sliced experts.
        device: ``"cpu"`` (gloo workers) or ``"cuda"`` (NCCL, one GPU per rank); default cuda if
        present.
        dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
        max_model_len: longest prompt + completion (default: the model's context).
        max_num_seqs: most sequences in the running batch.
        max_num_batched_tokens: token budget of one step (longer prompts are prefilled in chunks).
        gpu_memory_utilization: fraction of each device's memory the engine may use.
        device_memory: on CPU, each device's memory, e.g. ``"24GiB,12GiB"`` or a list (one per
            rank; one entry under a manual layout is the whole engine's); default: free RAM.
        device_speed: each device's relative throughput, e.g. ``"2,1"`` (an automatic pipeline
            gives faster devices more layers; default: on CUDA the GPU table's bandwidths).
        placement: ``"auto"`` builds the layout from the devices' memory when no TP/PP size or
            layer split is given (see :mod:`mgpu.engine.placement`); ``"manual"`` does not.
        block_size: tokens per KV block.
        num_blocks: fix the KV cache size in blocks instead of profiling (tests, reproducibility).
        cpu_reserved_cores: on CPU, cores kept free for the engine process (default: one when
            every rank still gets 4 cores, else 0: the workers get every core and wait
            passively, see :func:`~mgpu.engine.executor.cpu_shares`).
        compile_decode: compile decode steps with ``torch.compile`` (inductor): slower start-up
            (tens of seconds, a C++ compiler on CPU), then faster decoding of small models.
        enforce_eager: no CUDA graphs: every step runs eagerly (on CUDA decode steps are
            captured as graphs at start-up by default, see :mod:`mgpu.engine.cuda_graph`; CPU
            steps are always eager).
        enable_prefix_caching: share the KV blocks of equal prompt prefixes between requests.
        tokenizer: tokenizer directory or hub id (default: the model's).
        chat_template: a Jinja chat template, or a file holding one (default: the tokenizer's).
        max_steps_in_flight: micro-batches outstanding at once (default: one per pipeline stage,
            but one on CPU when the machine has no core beyond the ranks; 1 runs one step at a
            time).
        async_scheduling: with a single pipeline stage, submit step N+1 before step N returns,
            its decoding sequences fed the tokens step N samples (the workers fill them in), so
            the workers never wait for the engine between steps (vLLM's async scheduling).
        nnodes: machines the ranks are spread over; node 0 (this process) hosts the rendezvous.
        master_addr: node 0's address, as the other nodes reach it.
        master_port: the rendezvous port (0: any free one, single node only).
        quantization: ``int8`` or ``int4`` weight-only quantization of a float checkpoint while
            loading (see docs/quantization.md); a GGUF file keeps its own types. With it,
            ``dtype="auto"`` means bfloat16, the activation dtype of the fused kernels.
        enable_lora: serve the LoRA adapters of ``lora_modules`` beside the base model.
        lora_modules: adapters, each ``name=DIR``, vLLM's JSON form or a
            :class:`~mgpu.lora.adapter.LoRAModule`; a request picks one with ``lora_request``.
        max_loras: adapters one batch may use (device slots).
        max_lora_rank: rank of every slot; an adapter of a higher rank is refused.

    Every keyword is an :class:`~mgpu.config.EngineArgs` field (see :meth:`from_engine_args`).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        tensor_parallel_size: int | None = None,
        pipeline_parallel_size: int | None = None,
        layer_split: tuple[int, ...] | None = None,
        enable_expert_parallel: bool = False,
        device: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None,
        gpu_memory_utilization: float = 0.9,
        device_memory: str | float | list | None = None,
        device_speed: str | float | list | None = None,
        placement: str = "auto",
        block_size: int = 16,
        num_blocks: int | None = None,
        cpu_reserved_cores: int | None = None,
        compile_decode: bool = False,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        max_steps_in_flight: int | None = None,
        async_scheduling: bool = True,
        nnodes: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 0,
        quantization: str | None = None,
        enable_lora: bool = False,
        lora_modules: SequenceABC[str | dict | LoRAModule] | None = None,
        max_loras: int = 1,
        max_lora_rank: int = 16,
    ):
        from transformers import AutoTokenizer

        # The layout is decided (or refused) here, before any process starts or weight is read.
        plan = resolve_engine(
            model,
            device=device,
            dtype=dtype,
            quantization=quantization,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            layer_split=layer_split,
            placement=placement,
            device_memory=device_memory,
            enable_expert_parallel=enable_expert_parallel,
            device_speed=device_speed,
        )
        self.model_path, self.model_config = plan.model_path, plan.model_config
        self.parallel_config = plan.parallel_config
        self.device, self.dtype = plan.device, plan.dtype
        rank_memory = plan.rank_memory_bytes
        is_gguf = self.model_path.is_file()  # a GGUF file or Ollama blob, not a HF directory
        if is_gguf:
            from mgpu.models.gguf import gguf_tokenizer
        else:
            safetensors_files(self.model_path)  # a directory without usable weights fails here
        self.max_steps_in_flight = max_steps_in_flight or self._default_steps_in_flight()
        if self.max_steps_in_flight < 1:
            raise ConfigError(f"--max-steps-in-flight must be >= 1, got {max_steps_in_flight}")
        # A looked-ahead step needs the tokens of the step before it on its first stage: with one
        # stage the output rank is on it. With several, the stages' micro-batches overlap instead.
        self.async_scheduling = (
            async_scheduling and self.parallel_config.pipeline_parallel_size == 1
        )
        if async_scheduling and not self.async_scheduling:
            logger.info(
                "async scheduling is for single-stage layouts: with %d pipeline stages their "
                "micro-batches overlap instead",
                self.parallel_config.pipeline_parallel_size,
            )
        if self.device == "cuda":
            self._check_gpus()
        context = self.model_config.max_position_embeddings
        if max_model_len is not None and max_model_len > context:
            raise ConfigError(
                f"--max-model-len {max_model_len} exceeds the model's context of {context} tokens"
            )
        max_len = max_model_len or context
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens or max(2048, min(max_len, 8192)),
            max_model_len=max_len,
        )
        self.cache_config = CacheConfig(
            block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization,
            rank_memory_bytes=rank_memory,
            num_blocks_override=num_blocks,
            enable_prefix_caching=enable_prefix_caching,
        )
        tokenizer_path = str(resolve_model_path(tokenizer)) if tokenizer else str(self.model_path)
        try:
            self.tokenizer = (
                gguf_tokenizer(self.model_path)
                if is_gguf and tokenizer is None
                else AutoTokenizer.from_pretrained(tokenizer_path)
            )
        except Exception as exc:
            raise ConfigError(f"cannot load the tokenizer of {tokenizer_path}: {exc}") from None
        if chat_template is not None:
            template = Path(chat_template)
            self.tokenizer.chat_template = (
                template.read_text() if template.is_file() else chat_template
            )
        self.eos_token_ids = self._eos_ids()
        dtype_name = str(self.dtype).removeprefix("torch.")
        launch_config = LaunchConfig(
            device_type=self.device,
            dtype_name=dtype_name,
            cache_config=self.cache_config,
            cpu_reserved_cores=cpu_reserved_cores,
            compile_decode=compile_decode,
            tp_collective_bytes=self._tp_collective_bytes(),
            max_steps_in_flight=self.max_steps_in_flight + self.async_scheduling,
            nnodes=nnodes,
            master_addr=master_addr,
            master_port=master_port,
            quantization=quantization,
        )
        self.lora_config, adapters = self._check_lora(
            model, enable_lora, lora_modules, max_loras, max_lora_rank
        )
        self.graph_mode = self._graph_mode(enforce_eager)
        #: Each rank's decode-graph report from start-up (empty without graphs).
        self.graph_reports: list[GraphReport] = []
        if self.device == "cpu":  # built here once per machine, before the workers load it
            cpu_kernels.kernel()
        self.executor = Executor(
            self.model_path, self.model_config, self.parallel_config, launch_config
        )
        try:
            if self.lora_config is not None:
                cfg = self.lora_config
                slot_bytes = self.executor.call_all(
                    "load_lora", adapters, cfg.max_loras, cfg.max_lora_rank
                )
                logger.info("LoRA slots: %.1f MiB on the largest rank", max(slot_bytes) / 2**20)
            self._init_cache()
            self._init_decode_graphs()
        except BaseException:
            self.executor.shutdown()
            raise
        self._lock = threading.RLock()
        self._requests: dict[str, _Request] = {}
        self._seq_counter = itertools.count()
        self._registered: set[int] = set()
        self._to_release: list[int] = []
        # Batches submitted and not yet collected, oldest first (disjoint sets of sequences).
        self._in_flight: deque[list[ScheduledSeq]] = deque()
        # Outputs of steps collected by _drain(), handed out by the next step().
        self._drained: list[RequestOutput] = []
        self.stats = EngineStats()
        self._lora_slots = SlotTable(self.lora_config.max_loras) if self.lora_config else None
        # Called (on the engine's thread) with each sequence's seconds from arrival to its first
        # step: the metrics' queue-time histogram.
        self.queue_time_listeners: list[Callable[[float], None]] = []

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        """An engine with the settings of ``args`` (the CLI and ``LLM`` both come through here)."""
        return cls(args.model, **args.engine_kwargs())

    # ---- set-up -------------------------------------------------------------------------------

    def _check_lora(
        self,
        model: str | Path | None,
        enable_lora: bool,
        modules: SequenceABC[str | dict | LoRAModule] | None,
        max_loras: int,
        max_lora_rank: int,
    ) -> tuple[LoRAConfig | None, list[AdapterInfo]]:
        """Parse and validate the adapters (before any worker starts); None without LoRA."""
        name = str(model) if model is not None else str(self.model_path)
        return check_lora(self.model_config, name, enable_lora, modules, max_loras, max_lora_rank)

    @property
    def lora_names(self) -> dict[str, int]:
        """Served adapter name -> adapter id (empty without LoRA)."""
        return self.lora_config.ids if self.lora_config is not None else {}

    def lora_path(self, name: str) -> str:
        """The directory of the adapter served as ``name``."""
        assert self.lora_config is not None
        return self.lora_config.modules[self.lora_names[name] - 1].path

    def _default_steps_in_flight(self) -> int:
        """One micro-batch per pipeline stage, except on CPU without a core to spare for this
        process: there its host work takes turns with a stage and halved micro-batches double
        the per-step overhead, and one step at a time was faster (benchmarks/pipeline_overlap.py:
        0.57x and 0.78x with two in flight at PP=2 on 2 cores in two runs, docs/benchmarks.md)."""
        pp = self.parallel_config.pipeline_parallel_size
        if self.device == "cpu" and len(os.sched_getaffinity(0)) <= self.parallel_config.world_size:
            return 1
        return pp

    def _tp_collective_bytes(self) -> int:
        """Bytes of the largest TP collective of a step: a (tokens, hidden) all-reduce or the
        (sequences, vocab / tp) logits gather, capped at 64 MiB per rank (gloo takes larger)."""
        elem = torch.finfo(self.dtype).bits // 8
        tp = self.parallel_config.tensor_parallel_size
        sched, model = self.scheduler_config, self.model_config
        activations = sched.max_num_batched_tokens * model.hidden_size * elem
        logits = sched.max_num_seqs * padded_vocab_size(model.vocab_size, tp) // tp * elem
        return min(max(activations, logits), 64 * 2**20)

    def _check_gpus(self) -> None:
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA GPU is visible; use --device cpu")
        have, need = torch.cuda.device_count(), self.parallel_config.world_size
        if need > have:
            raise ConfigError(
                f"the layout needs {need} GPUs but {have} are visible (CUDA_VISIBLE_DEVICES); "
                "lower --tensor-parallel-size / --pipeline-parallel-size"
            )

    def _eos_ids(self) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = self.model_path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids

    def _graph_mode(self, enforce_eager: bool) -> str | None:
        """``cuda`` (capture decode graphs), ``eager`` (graph-shaped steps on CPU, under the
        tests' :data:`~mgpu.engine.cuda_graph.GRAPH_SHAPED_ENV`) or None (plain steps)."""
        if enforce_eager:
            return None
        if self.device == "cuda":
            return "cuda"
        return "eager" if os.environ.get(GRAPH_SHAPED_ENV) == "1" else None

    def _init_cache(self) -> None:
        per_rank = self.executor.call_all(
            "profile_num_blocks",
            self.scheduler_config,
            self.parallel_config.world_size,
            self.graph_mode,
        )
        num_blocks = min(per_rank)
        need = blocks_for_tokens(self.scheduler_config.max_model_len, self.cache_config.block_size)
        if num_blocks < need:
            raise ConfigError(
                f"the KV cache fits only {num_blocks * self.cache_config.block_size} tokens per "
                f"rank, fewer than --max-model-len {self.scheduler_config.max_model_len}; lower "
                "--max-model-len, raise --gpu-memory-utilization, or use more devices"
            )
        self.executor.call_all("allocate_kv_cache", num_blocks, self.graph_mode is not None)
        self.block_manager = BlockManager(
            num_blocks, self.cache_config.block_size, self.cache_config.enable_prefix_caching
        )
        max_loras = self.lora_config.max_loras if self.lora_config is not None else None
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager, max_loras)

    def _init_decode_graphs(self) -> None:
        """Capture the decode graphs on every rank (or prepare graph-shaped steps), and say once
        what runs eagerly and why. A capture error on any rank turns graphs off on all of them:
        the TP ranks of a stage must replay the same graphs (NCCL's rule for captured
        collectives)."""
        mode = self.graph_mode
        if mode is None:
            return
        reports = self.executor.call_all("prepare_decode_graphs", self.scheduler_config, mode)
        failed = [(rank, r.error) for rank, r in enumerate(reports) if r.error is not None]
        if failed:
            self.executor.call_all("release_decode_graphs")
            rank, error = failed[0]
            logger.warning(
                "CUDA graphs off, decode steps run eagerly: rank %d failed %s", rank, error
            )
            return
        self.graph_reports = reports
        for reason in sorted({r.disabled for r in reports if r.disabled is not None}):
            ranks = [rank for rank, r in enumerate(reports) if r.disabled == reason]
            logger.warning(
                "CUDA graphs off on rank(s) %s, their decode steps run eagerly: %s",
                ", ".join(map(str, ranks)),
                reason,
            )
        captured = [r for r in reports if r.num_graphs]
        if captured:
            r = captured[0]
            kind = "CUDA graphs" if mode == "cuda" else "graph-shaped steps (eager, CPU)"
            logger.info(
                "%s: %d decode shapes, batch sizes %s x block widths %s, in %.1f s and %.0f MiB "
                "on the largest rank; steps with a prefill or gathering over %d keys run eagerly",
                kind,
                r.num_graphs,
                ",".join(map(str, r.batch_sizes)),
                ",".join(map(str, r.widths)),
                max(x.seconds for x in captured),
                max(x.memory_bytes for x in captured) / 2**20,
                MAX_GRAPH_KEYS,
            )

    @property
    def rank_reports(self) -> list[RankReport]:
        """What each rank reported after loading (layer range, parameter bytes, KV bytes/token)."""
        return self.executor.reports

    def live_rank_reports(self) -> list[RankReport]:
        """Fresh per-rank reports (resident memory now)."""
        with self._lock:
            self._drain()
            return self.executor.call_all("report")

    def layout(self) -> list[dict[str, object]]:
        """One row per rank: rank, node, device, layers ``[start, end)``, ``param_bytes`` with the
        planner's ``predicted_param_bytes`` beside it, and ``kv_blocks``."""
        from mgpu.engine.headless import ResolvedPlan, planned_ranks

        plan = ResolvedPlan(
            self.model_path,
            self.model_config,
            self.parallel_config,
            self.device,
            self.dtype,
            quantization=self.executor.launch_config.quantization,
        )
        rows = planned_ranks(plan, self.executor.launch_config.nnodes)
        for row, report in zip(rows, self.rank_reports, strict=True):
            row["device"] = report.device
            row["layers"] = list(report.layer_range)
            row["param_bytes"] = report.param_bytes
            row["kv_blocks"] = self.block_manager.num_blocks
        keys = ("rank", "node", "device", "layers", "param_bytes", "predicted_param_bytes")
        return [{**{k: row[k] for k in keys}, "kv_blocks": row["kv_blocks"]} for row in rows]

    @property
    def num_kv_tokens(self) -> int:
        """Tokens the KV cache holds."""
        return self.block_manager.num_blocks * self.cache_config.block_size

    # ---- requests -----------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's BOS where it adds one)."""
        return list(self.tokenizer(prompt).input_ids)

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template, ready to answer."""
        return render_chat(self.tokenizer, messages)

    def check_prompt(self, prompt_token_ids: list[int], max_tokens: int | None) -> int:
        """Validate a prompt; returns the effective ``max_tokens`` (capped by the context)."""
        n, limit = len(prompt_token_ids), self.scheduler_config.max_model_len
        if n == 0:
            raise PromptError("the prompt is empty")
        if n >= limit:
            raise PromptError(
                f"the prompt has {n} tokens but --max-model-len is {limit}: it must leave room for "
                "at least one new token"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        room = limit - n
        return room if max_tokens is None else min(max_tokens, room)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        lora_request: str | None = None,
    ) -> None:
        """Queue a request; it joins the running batch at the next step.

        Args:
            request_id: unique among the requests in flight.
            prompt: the prompt text (tokenized unless ``prompt_token_ids`` is given).
            params: sampling parameters.
            prompt_token_ids: the prompt's token ids.
            lora_request: name of a served LoRA adapter (None: the base model).
        """
        lora_id = self.lora_id(lora_request)
        ids = (
            list(prompt_token_ids) if prompt_token_ids is not None else self.tokenize(prompt or "")
        )
        max_tokens = self.check_prompt(ids, params.max_tokens)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        with self._lock:
            if request_id in self._requests:
                raise PromptError(f"request id {request_id!r} is already in use")
            seqs = []
            for i in range(params.n):
                child = params
                if params.n > 1 and params.seed is not None:
                    # Distinct but reproducible streams for the n completions of a seeded request.
                    child = SamplingParams(**{**params.__dict__, "seed": params.seed + i, "n": 1})
                seq = Sequence(next(self._seq_counter), request_id, i, ids, child, max_tokens)
                seq.lora_id = lora_id
                seq.cache_salt = f"lora:{lora_id}".encode() if lora_id else b""
                seqs.append(seq)
                self.scheduler.add(seq)
            self._requests[request_id] = _Request(
                request_id, prompt, ids, seqs, time.time(), stop_holdback=holdback
            )

    def lora_id(self, lora_request: str | None) -> int:
        """The adapter id of a served adapter name (0 for None, the base model).

        Args:
            lora_request: a name given in ``--lora-modules``, or None.
        """
        if lora_request is None:
            return 0
        names = self.lora_names
        if lora_request not in names:
            served = ", ".join(names) or "none (start with --enable-lora --lora-modules)"
            raise UnknownAdapterError(
                f"no LoRA adapter named {lora_request!r} is served; adapters: {served}"
            )
        return names[lora_request]

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (no-op if it already finished)."""
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is None:
                return
            for seq in req.seqs:
                if not seq.is_finished:
                    seq.finish("abort")
                    self._release(seq)
            self._update_stats()

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.seq_id in self._registered:
            self._registered.discard(seq.seq_id)
            self._to_release.append(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running (or has outputs not yet handed out)."""
        return bool(self._drained) or self.scheduler.has_unfinished()

    # ---- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Advance the engine by one collected step; returns the requests that progressed.

        Up to ``max_steps_in_flight`` (default: ``pipeline_parallel_size``) disjoint micro-batches
        are in flight, so every pipeline stage works at once. The oldest is collected, its tokens
        appended, the next batches sent out, and only then is the host work done (detokenising,
        stop strings) while the workers compute: with one stage, step N+1 runs while step N is
        post-processed.
        """
        with self._lock:
            drained, self._drained = self._drained, []
            self._fill_pipeline()
            if not self._in_flight:
                return drained
            scheduled = self._in_flight[0]
            try:
                results = self.executor.collect()
            except BaseException:
                self._in_flight.clear()  # the workers are gone: nothing will answer
                raise
            self._in_flight.popleft()
            touched = self._advance(scheduled, results)
            self._fill_pipeline()
            outputs = self._finish_text(touched)
            self._update_stats()
            return drained + outputs

    def _fill_pipeline(self) -> None:
        """Submit steps until ``max_steps_in_flight`` are in flight or nothing is left to run;
        with async scheduling, then one more, which looks ahead of the steps in flight: the
        sequences they sample for decode the sampled tokens in it (see ``Scheduler``)."""
        depth = self.max_steps_in_flight
        while len(self._in_flight) < depth + self.async_scheduling:
            seen = collections.Counter(item.seq.seq_id for b in self._in_flight for item in b)
            lookahead = set()
            if self.async_scheduling:
                # A sequence with one sampling chunk in flight: its next token is that one's.
                lookahead = {
                    item.seq.seq_id
                    for batch in self._in_flight
                    for item in batch
                    if item.samples and seen[item.seq.seq_id] == 1 and not item.seq.is_finished
                }
            max_seqs = self.scheduler_config.max_num_seqs
            free = self.scheduler.waiting and len(self.scheduler.running) < max_seqs
            ready = sum(1 for seq in self.scheduler.running if seq.seq_id not in seen)
            ready += len(lookahead) + (len(self.scheduler.waiting) if free else 0)
            if not ready:
                return
            # One micro-batch per free slot: the sequences not in flight, cut evenly (a
            # look-ahead step takes them all).
            per_batch = -(-ready // max(1, depth - len(self._in_flight)))  # ceil
            plan = self.scheduler.schedule(set(seen), max_seqs=per_batch, lookahead=lookahead)
            if not plan.scheduled:
                return
            self._submit(plan.scheduled)

    def _submit(self, scheduled: list[ScheduledSeq]) -> None:
        """Send one scheduled batch to the workers as a step."""
        step = StepInput([], finished_seqs=self._to_release)
        self._to_release = []
        if self._lora_slots is not None:
            step.lora_slots = self._lora_slots.assign(item.seq.lora_id for item in scheduled)
        for item in scheduled:
            seq = item.seq
            start = item.start_pos
            tokens = (
                [DEFERRED_TOKEN]
                if item.deferred
                else seq.all_token_ids[start : start + item.num_tokens]
            )
            table, lora = list(seq.block_table), seq.lora_id
            step.chunks.append(SeqChunk(seq.seq_id, tokens, start, table, item.samples, lora))
            if seq.seq_id not in self._registered:
                self._registered.add(seq.seq_id)
                step.new_seqs[seq.seq_id] = seq.params
                self._first_scheduled(seq)
        self.executor.submit("execute", step)
        self._in_flight.append(scheduled)

    def _first_scheduled(self, seq: Sequence) -> None:
        """Tell the queue-time listeners how long ``seq`` waited for its first step."""
        req = self._requests.get(seq.request_id)
        if req is None or not self.queue_time_listeners:
            return
        waited = max(0.0, time.time() - req.arrival_time)
        for listener in self.queue_time_listeners:
            listener(waited)

    def _advance(
        self, scheduled: list[ScheduledSeq], results: list[SampleResult]
    ) -> dict[str, _Request]:
        """Count a collected step's tokens and append its samples (no detokenising yet)."""
        touched: dict[str, _Request] = {}
        sampled = iter(results)
        now = time.time()
        for item in scheduled:
            seq = item.seq
            result = next(sampled) if item.samples else None
            if seq.is_finished:
                continue  # aborted, or stopped by a stop string while this step was in flight
            self._count_prefill(seq, seq.num_computed_tokens, item.num_tokens)
            seq.num_computed_tokens += item.num_tokens
            req = self._requests.get(seq.request_id)
            if result is None or req is None:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            self._append_or_fail(seq, result)
            touched[req.request_id] = req
        return touched

    def _finish_text(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        """Detokenise the new tokens, apply stop strings, build the outputs of ``touched``."""
        for req in touched.values():
            for seq in req.seqs:
                try:
                    self._detokenize(seq)
                except Exception as exc:  # a tokenizer bug fails its request, never the engine
                    logger.exception("request %s failed while detokenizing", seq.request_id)
                    self._fail_seq(
                        seq, f"detokenizing the output failed: {type(exc).__name__}: {exc}"
                    )
        outputs = [self._output(req) for req in touched.values()]
        for out in outputs:
            if out.finished:
                self._requests.pop(out.request_id, None)
        return outputs

    def _drain(self) -> None:
        """Collect every step in flight (before a call that needs all ranks idle); their outputs
        are returned by the next :meth:`step`."""
        while self._in_flight:
            scheduled = self._in_flight[0]
            results = self.executor.collect()
            self._in_flight.popleft()
            self._drained.extend(self._finish_text(self._advance(scheduled, results)))

    def _count_prefill(self, seq: Sequence, start: int, n: int) -> None:
        """Count the fed positions [start, start + n) as prompt work, or as recomputation when
        the sequence was pre-empted before: its prompt and all but its newest generated token
        had their keys and values computed once already."""
        end, prompt = start + n, len(seq.prompt_token_ids)
        prompt_part = max(0, min(end, prompt) - start)
        if seq.num_preemptions == 0:
            self.stats.prompt_tokens_total += prompt_part
            return
        outputs_part = max(0, min(end, seq.num_tokens - 1) - max(start, prompt))
        self.stats.recomputed_tokens_total += prompt_part + outputs_part

    def _append_or_fail(self, seq: Sequence, result: SampleResult) -> None:
        """Append a sampled token; a sequence that could not be sampled finishes with
        ``finish_reason="error"`` and the reason in ``stop_reason``, and only its request fails
        (the server answers it with a 500)."""
        if result.error is not None:
            self._fail_seq(seq, result.error)
            return
        try:
            self._append(seq, result)
        except Exception as exc:
            logger.exception("request %s failed after sampling", seq.request_id)
            self._fail_seq(seq, f"appending the sampled token failed: {type(exc).__name__}: {exc}")

    def _fail_seq(self, seq: Sequence, error: str) -> None:
        """Finish one sequence with an error; the engine and every other request go on."""
        if not seq.is_finished:
            seq.finish("error", error)
        self._release(seq)

    def _append(self, seq: Sequence, result: SampleResult) -> None:
        """Add a sampled token and apply the checks that need no text: EOS, stop ids, length."""
        token = result.token_id
        seq.output_token_ids.append(token)
        seq.pending_text = True
        self.stats.generation_tokens_total += 1
        if seq.params.logprobs is not None:
            seq.logprobs.append(result)
            seq.cumulative_logprob += result.logprob or 0.0
        params = seq.params
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop")
        elif token in params.stop_token_ids:
            seq.finish("stop", token)
        elif (
            len(seq.output_token_ids) >= seq.max_tokens
            or seq.num_tokens >= self.scheduler_config.max_model_len
        ):
            seq.finish("length")
        if seq.is_finished:
            self._release(seq)

    def _detokenize(self, seq: Sequence) -> None:
        """Turn a sequence's new token into text; a stop string may finish it here."""
        if not seq.pending_text:
            return
        seq.pending_text = False
        was_finished = seq.is_finished
        new_text = detokenize_incrementally(self.tokenizer, seq, flush=was_finished)
        if seq.finish_reason in (None, "length") and seq.params.stop and new_text:
            self._check_stop_strings(seq, len(new_text))
            if seq.is_finished and not was_finished:
                self._release(seq)

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_len: int) -> None:
        text = seq.output_text
        longest = max(len(s) for s in seq.params.stop)
        # Only the new text, plus enough before it to catch a stop string spanning the boundary.
        begin = max(0, len(text) - new_len - longest + 1)
        hits = [(text.find(s, begin), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, stop = min(hits)
            seq.output_text = text[:index]
            seq.finish("stop", stop)

    def _output(self, req: _Request) -> RequestOutput:
        outputs = []
        for seq in req.seqs:
            text = seq.output_text
            if not seq.is_finished and req.stop_holdback:
                text = text[: len(text) - _pending_stop_prefix(text, seq.params.stop)]
            # A copy: the output goes to another thread while the sequence keeps growing.
            logprobs = list(seq.logprobs) if seq.params.logprobs is not None else None
            cumulative = seq.cumulative_logprob if logprobs else None
            outputs.append(
                CompletionOutput(
                    seq.index,
                    text,
                    list(seq.output_token_ids),
                    cumulative,
                    logprobs,
                    seq.finish_reason,
                    seq.stop_reason,
                )
            )
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            outputs,
            all(s.is_finished for s in req.seqs),
            req.arrival_time,
            req.first_token_time,
        )

    def _update_stats(self) -> None:
        s = self.stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_cache_usage = self.block_manager.usage
        s.num_free_blocks = self.block_manager.num_free_blocks
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries_total = self.block_manager.num_queried_tokens
        s.prefix_cache_hits_total = self.block_manager.num_hit_tokens

    # ---- scoring and lifecycle ----------------------------------------------------------------

    def prompt_logits(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """(T, vocab) float32 logits at every position of one prompt (for scoring and tests)."""
        self.check_prompt(prompt_token_ids, None)
        with self._lock:
            if self.scheduler.has_unfinished():
                raise MgpuError("prompt_logits needs an idle engine (requests are in flight)")
            self._drain()
            replies = self.executor.call_all("prompt_logits", list(prompt_token_ids))
            self.block_manager.reset_prefix_cache()  # the call wrote over the cached blocks
        return replies[self.executor.output_rank]

    @property
    def is_healthy(self) -> bool:
        """Whether every worker is alive."""
        return self.executor.is_alive

    def shutdown(self) -> None:
        """Stop the workers."""
        self.executor.shutdown()


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered by ``tokenizer``'s chat template, ready to answer.

    Args:
        tokenizer: a Hugging Face tokenizer, used only by the calling thread.
        messages: ``{"role", "content"}`` dicts.
    """
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja errors, a tokenizer without a template
        raise PromptError(f"cannot apply the model's chat template: {exc}") from None
    # transformers 5 returns a BatchEncoding (a Mapping), older versions a list.
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def _pending_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-k:]):
                best = k
                break
    return best
