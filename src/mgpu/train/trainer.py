"""The training loop: PEFT LoRA on a ``transformers`` model, data parallel through Accelerate.

Every process holds the whole (frozen) base model and the LoRA weights. Accelerate wraps the model
in DDP (gloo on CPU, NCCL on GPUs) and shards each global batch: with ``N`` processes, process ``i``
takes samples ``i*b .. (i+1)*b - 1`` of every ``N*b`` the seeded sampler draws, so no two processes
see the same sample in a step. DDP averages the LoRA gradients in ``backward``, so after each
optimizer step every process holds the same weights (the run records a checksum per process to
show it). One optimizer step consumes ``per_device_train_batch_size x processes x
gradient_accumulation_steps`` samples: the effective batch, printed at the start.

The learning rate warms up linearly over the first 3% of the optimizer steps, then decays linearly
to zero; gradients are clipped to norm 1.0 (the ``transformers.Trainer`` defaults).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mgpu.errors import ConfigError, MgpuError
from mgpu.train.args import TrainArgs
from mgpu.train.checkpoint import (
    check_output_dir,
    checkpoint_dir,
    publish,
    read_state,
    resolve_resume,
    temp_dir,
    write_state,
)
from mgpu.train.data import SampleDataset, load_jsonl, pad_collate

WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0
SUMMARY_FILE = "train_summary.json"
ADAPTER_SUBDIR = "adapter"


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports (also written to ``OUTPUT/train_summary.json``).

    Args:
        global_step: optimizer steps taken.
        losses: training loss of every step (mean over processes and accumulated micro-batches).
        eval_loss: token-averaged loss on the eval set after the last epoch, if one was given.
        tokens_per_s: non-padding tokens per second over all processes.
        seconds: wall time of the training loop.
        adapter_dir: where the final PEFT adapter was written.
    """

    global_step: int
    losses: list[float]
    eval_loss: float | None
    tokens_per_s: float
    seconds: float
    adapter_dir: str


def _model_path(args: TrainArgs) -> str:
    from mgpu.models.loader import demo_model_path

    return args.model_name if args.model_name else str(demo_model_path())


def _param_checksum(model: torch.nn.Module) -> float:
    """A sum over every trainable weight: equal on all processes when DDP keeps them in step."""
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.requires_grad:
            total += p.detach().double().abs().sum().cpu()
    return float(total)


def _evaluate(accelerator: Any, model: torch.nn.Module, loader: Any) -> float:
    """Token-averaged loss over the whole eval set, summed over every process."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (loss sum, tokens)
    with torch.no_grad():
        for batch in loader:
            batch.pop("index")
            out = model(**batch)
            tokens = (batch["labels"][:, 1:] != -100).sum()
            totals[0] += out.loss.double() * tokens
            totals[1] += tokens
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


def train(args: TrainArgs) -> TrainResult:
    """Run one LoRA training (in every process the launcher started).

    Args:
        args: the run's settings.

    Raises:
        MgpuError: a bad dataset, an unusable output directory or a missing checkpoint, all found
            before the first step.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    output_dir = args.output_path
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "runs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    main = accelerator.is_main_process
    check_output_dir(output_dir, needed_bytes=0)
    resume = resolve_resume(output_dir, args.resume_from_checkpoint)

    model_path = _model_path(args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_samples = load_jsonl(args.dataset_path, tokenizer, args.max_seq_length)
    eval_samples = (
        load_jsonl(args.eval_dataset_path, tokenizer, args.max_seq_length)
        if args.eval_dataset_path
        else None
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.modules,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"--target_modules {args.target_modules}: {exc}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Adapter + two AdamW moments in float32, in a checkpoint and its temp copy, plus slack.
    check_output_dir(output_dir, needed_bytes=trainable * 4 * 3 * 2 + 16 * 2**20)

    def collate(samples: list[Any]) -> dict[str, torch.Tensor]:
        return pad_collate(samples, pad_id)

    train_loader = torch.utils.data.DataLoader(
        SampleDataset(train_samples),
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collate,
        # Its own generator: starting an epoch must not draw from the global RNG that dropout
        # uses, or a resumed run (which starts its epoch afresh) would drop different units.
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loader = None
    if eval_samples is not None:
        eval_loader = accelerator.prepare(
            torch.utils.data.DataLoader(
                SampleDataset(eval_samples),
                batch_size=args.per_device_train_batch_size,
                collate_fn=collate,
            )
        )

    micro_per_epoch = len(train_loader)  # micro-batches per process per epoch
    steps_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
    total_steps = max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(WARMUP_RATIO * total_steps), total_steps
    )
    accelerator.register_for_checkpointing(scheduler)

    def save_hook(models: list[Any], weights: list[Any], directory: str) -> None:
        # Only the adapter is worth saving: the base weights are frozen and already on disk.
        if main:
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(Path(directory) / ADAPTER_SUBDIR)
        weights.clear()

    def load_hook(models: list[Any], directory: str) -> None:
        while models:
            peft_model = accelerator.unwrap_model(models.pop())
            state = load_file(str(Path(directory) / ADAPTER_SUBDIR / "adapter_model.safetensors"))
            set_peft_model_state_dict(peft_model, state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, start_epoch, skip, losses = 0, 0, 0, []
    if resume is not None:
        state = read_state(resume)
        if state["num_processes"] != accelerator.num_processes:
            raise MgpuError(
                f"{resume} was written by {state['num_processes']} process(es); resume it with "
                f"--num_processes {state['num_processes']} (the data position is per process)"
            )
        accelerator.load_state(str(resume))
        global_step, start_epoch, skip = state["global_step"], state["epoch"], state["micro_step"]
        losses = list(state["losses"])

    n = accelerator.num_processes
    effective = args.per_device_train_batch_size * n * args.gradient_accumulation_steps
    if main:
        print(
            f"mgpu train: {len(train_samples)} samples, {trainable:,} trainable parameters; "
            f"effective batch {args.per_device_train_batch_size} per device x {n} processes x "
            f"{args.gradient_accumulation_steps} accumulation = {effective}; {total_steps} steps"
            + (f", resuming at step {global_step} from {resume}" if resume else ""),
            flush=True,
        )
    if args.report_to == "tensorboard":
        accelerator.init_trackers("mgpu-train", config={"effective_batch": effective})

    def save(step: int, epoch: int, micro: int) -> None:
        tmp = temp_dir(output_dir, step)
        if main and tmp.exists():  # left by a crash mid-write
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            write_state(
                tmp,
                {
                    "global_step": step,
                    "epoch": epoch,
                    "micro_step": micro,
                    "num_processes": n,
                    "losses": losses,
                },
            )
            publish(tmp, checkpoint_dir(output_dir, step))
        accelerator.wait_for_everyone()

    first_samples: list[list[int]] = []
    checksums: list[float] = []
    window = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, micro, tokens
    tokens_total, last_saved, eval_loss = 0, -1, None
    bar = tqdm(total=total_steps, initial=global_step, disable=not main, desc="training")
    model.train()
    started = tick = time.perf_counter()
    for epoch in range(start_epoch, num_epochs):
        if global_step >= total_steps:
            break
        train_loader.set_epoch(epoch)
        micro = skip if epoch == start_epoch else 0
        loader = accelerator.skip_first_batches(train_loader, micro) if micro else train_loader
        for batch in loader:
            index = batch.pop("index")
            if global_step == 0 and micro < args.gradient_accumulation_steps:
                gathered = accelerator.gather(index).reshape(n, -1)  # (processes, batch)
                if not first_samples:
                    first_samples = [[] for _ in range(n)]
                for rank in range(n):
                    first_samples[rank] += gathered[rank].tolist()
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad()
            micro += 1
            window[0] += out.loss.detach().double()
            window[1] += 1
            window[2] += batch["attention_mask"].sum()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            global_step += 1
            now = time.perf_counter()
            per_rank = accelerator.gather(window.unsqueeze(0))  # (processes, 3)
            loss = float((per_rank[:, 0] / per_rank[:, 1]).mean())
            rank_tokens_per_s = (per_rank[:, 2] / max(now - tick, 1e-9)).tolist()
            tokens_total += int(per_rank[:, 2].sum())
            losses.append(loss)
            window.zero_()
            tick = now
            if global_step == 1:
                checksums = accelerator.gather(
                    torch.tensor([_param_checksum(model)], device=accelerator.device)
                ).tolist()
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{sum(rank_tokens_per_s):.0f}")
            if args.report_to == "tensorboard":
                logs = {"train/loss": loss, "train/learning_rate": lr}
                for rank, value in enumerate(rank_tokens_per_s):
                    logs[f"tokens_per_s/process_{rank}"] = value
                accelerator.log(logs, step=global_step)
            if args.save_steps and global_step % args.save_steps == 0:
                at_end = micro >= micro_per_epoch
                save(global_step, epoch + 1 if at_end else epoch, 0 if at_end else micro)
                last_saved = global_step
            if global_step >= total_steps:
                break
        if eval_loader is not None:
            eval_loss = _evaluate(accelerator, model, eval_loader)
            if main:
                bar.write(f"epoch {epoch + 1}: eval loss {eval_loss:.4f}")
            if args.report_to == "tensorboard":
                accelerator.log({"eval/loss": eval_loss}, step=global_step)
    seconds = time.perf_counter() - started
    bar.close()
    if last_saved != global_step:
        save(global_step, num_epochs, 0)
    if main:
        accelerator.unwrap_model(model).save_pretrained(output_dir)
    accelerator.wait_for_everyone()
    tokens_per_s = tokens_total / max(seconds, 1e-9)
    result = TrainResult(
        global_step, losses, eval_loss, tokens_per_s, seconds, str(output_dir.resolve())
    )
    if main:
        summary = {
            **dataclasses.asdict(result),
            "effective_batch": effective,
            "num_processes": n,
            "first_step_samples": first_samples,
            "param_checksums_after_first_step": checksums,
        }
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        first = f"{losses[0]:.4f} -> " if losses else ""
        last = f"{losses[-1]:.4f}" if losses else "n/a"
        evaluated = f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""
        print(
            f"mgpu train: done: {global_step} steps in {seconds:.1f} s, loss {first}{last}"
            f"{evaluated}, {tokens_per_s:.0f} tokens/s on {n} process(es); "
            f"adapter in {output_dir}",
            flush=True,
        )
    accelerator.end_training()
    return result
