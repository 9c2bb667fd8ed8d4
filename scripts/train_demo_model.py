"""Train the tiny Llama model bundled with mgpu in ``src/mgpu/demo_model/``, from scratch, offline.

The demo model lets the examples, the CLI and the test-suite run a real Hugging Face checkpoint
without downloading anything. It is a toy: it has learnt some English phrasing from the Python
documentation, nothing more, and is not a useful assistant.

Everything is rebuilt from what every CPython installation carries:

1. **Corpus.** The documentation topics of ``pydoc_data.topics`` (the text behind ``help("if")``)
   plus the docstrings (``inspect.getdoc``) of the standard-library modules, their public classes,
   functions and methods. Modules are imported one by one in sorted order; modules with side effects
   on import (``antigravity``, ``this``, GUI toolkits, ...) and private or test modules are skipped,
   as is any module that fails to import. Texts are deduplicated and kept in a deterministic order.
   A small share of the docstrings (``--chat-fraction``) is also rendered as one-turn chat
   conversations with the chat template, so that the model sees the ``<|im_start|>``/``<|im_end|>``
   structure and learns to end an assistant turn. One document in ``--val-every`` is held out to
   measure a validation loss.
2. **Tokenizer.** A byte-level BPE (``tokenizers``) with ``--vocab-size`` entries, including the
   special tokens ``<|begin_of_text|>`` (bos), ``<|end_of_text|>`` (eos and pad), ``<|im_start|>``
   and ``<|im_end|>``. ``tokenizer_config.json`` carries a ChatML-style Jinja ``chat_template``.
   Encoding prepends bos, like Llama 3 tokenizers.
3. **Model.** ``LlamaForCausalLM`` with hidden size ``--hidden-size``, ``--layers`` decoder layers,
   ``--heads`` query heads and ``--kv-heads`` key/value heads (grouped-query attention; 8 and 4 let
   the engine's tests split the model at tensor-parallel sizes 1, 2 and 4), a SwiGLU MLP of width
   ``--intermediate-size``, tied input/output embeddings, RoPE base 10000 and 1024 positions.
   Documents are packed into one token stream as ``bos text eos bos text eos ...`` and the model is
   trained on random windows of ``--seq-len`` tokens with AdamW (``--lr``, betas 0.9/0.95, weight
   decay on matrices only), gradient clipping at 1.0, a linear warm-up of ``--warmup-steps`` and a
   cosine decay to ``--min-lr-ratio`` of the peak. Training stops after ``--max-steps`` steps or
   ``--max-minutes`` minutes of wall-clock time, whichever comes first; the cosine follows whichever
   of the two is further along, so a time-limited run still ends at the low learning rate. On CPUs
   with native bfloat16 support the forward pass runs under bfloat16 autocast (``--autocast``),
   which is about 1.5x faster; the weights and the optimiser state stay in float32.
4. **Output.** ``config.json``, ``generation_config.json``, ``model.safetensors`` (one file, saved
   with ``save_pretrained``, float32 unless ``--save-dtype bfloat16``), ``tokenizer.json``,
   ``tokenizer_config.json`` and a ``README.md`` model card with the training figures.

The defaults are the settings of the bundled model; rebuild it with::

    python scripts/train_demo_model.py

It runs on one CPU thread (``--threads``) for about 15 minutes of training, then prints greedy
continuations of a few prompts. The corpus depends on the Python version, and a wall-clock budget
depends on the machine, so two runs agree in recipe rather than bit for bit; pass
``--max-minutes 0`` to stop on ``--max-steps`` alone.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import math
import pkgutil
import platform
import shlex
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "mgpu" / "demo_model"

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

#: ChatML-style template: bos, then ``<|im_start|>role\ncontent<|im_end|>\n`` per message.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

#: Top-level modules never imported: side effects on import, GUI toolkits, Windows-only modules,
#: the docs data (read separately) and ``distutils`` (which setuptools may replace in a venv).
SKIP_MODULES = frozenset(
    {
        "antigravity",
        "this",
        "tkinter",
        "idlelib",
        "turtle",
        "turtledemo",
        "test",
        "pydoc_data",
        "readline",
        "rlcompleter",
        "ensurepip",
        "distutils",
        "msilib",
        "msvcrt",
        "nt",
        "winreg",
        "winsound",
    }
)

SAMPLE_PROMPTS = [
    "The Python interpreter",
    "A list is",
    "The following",
    "This module provides",
    "Return the number of",
]


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """One text of the corpus; ``name`` is the documented object (empty for pydoc topics)."""

    name: str
    text: str


def _stdlib_dirs() -> tuple[str, ...]:
    """Directories that hold the standard library (not site-packages)."""
    paths = sysconfig.get_paths()
    return tuple(str(Path(paths[key]).resolve()) for key in ("stdlib", "platstdlib"))


def _is_stdlib_module(module: ModuleType, stdlib_dirs: tuple[str, ...]) -> bool:
    """Whether ``module`` is built in or lives in the standard library (not a shadowing package)."""
    file = getattr(module, "__file__", None)
    if file is None:
        return True
    resolved = str(Path(file).resolve())
    return resolved.startswith(stdlib_dirs) and "site-packages" not in resolved


def _quiet_import(name: str) -> ModuleType | None:
    """Import ``name`` with its output and warnings suppressed; ``None`` if the import fails."""
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):  # a module may raise anything on import
        return None


def iter_stdlib_modules() -> Iterator[ModuleType]:
    """Yield importable public standard-library modules and submodules, in sorted order."""
    stdlib_dirs = _stdlib_dirs()

    def walk(name: str) -> Iterator[ModuleType]:
        module = _quiet_import(name)
        if module is None or not _is_stdlib_module(module, stdlib_dirs):
            return
        yield module
        paths = getattr(module, "__path__", None)
        if not paths:
            return
        children = sorted({info.name for info in pkgutil.iter_modules(list(paths))})
        for child in children:
            if child.startswith("_") or child in {"test", "tests", "idle_test"}:
                continue
            yield from walk(f"{name}.{child}")

    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_MODULES:
            continue
        yield from walk(top)


def _getdoc(obj: Any) -> str | None:
    """``inspect.getdoc`` that never raises."""
    try:
        doc = inspect.getdoc(obj)
    except Exception:  # odd descriptors may raise anything
        return None
    return doc if isinstance(doc, str) else None


def _module_docs(module: ModuleType, seen: set[int]) -> Iterator[Doc]:
    """Docstrings of a module, its public functions and classes, and the classes' members.

    A member counts when it is defined in the module or in a private implementation module
    (``io.TextIOWrapper`` lives in ``_io``); ``seen`` holds the ids of objects already visited,
    so a re-exported object is read once.
    """
    mod_name = module.__name__
    doc = _getdoc(module)
    if doc:
        yield Doc(mod_name, doc)
    try:
        members = sorted(vars(module).items())
    except TypeError:
        return
    for name, obj in members:
        if name.startswith("_") or id(obj) in seen:
            continue
        owner = getattr(obj, "__module__", None)
        if not isinstance(owner, str) or (owner != mod_name and not owner.startswith("_")):
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        seen.add(id(obj))
        doc = _getdoc(obj)
        if doc:
            yield Doc(f"{mod_name}.{name}", doc)
        if not inspect.isclass(obj):
            continue
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") and attr != "__init__":
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if not (inspect.isroutine(member) or isinstance(member, property)):
                continue
            doc = _getdoc(member)
            if doc:
                yield Doc(f"{mod_name}.{name}.{attr}", doc)


def build_corpus(min_chars: int) -> list[Doc]:
    """Pydoc topics, then standard-library docstrings; deduplicated, in a deterministic order."""
    from pydoc_data.topics import topics

    docs: list[Doc] = []
    seen: set[str] = set()

    def add(doc: Doc) -> None:
        text = doc.text.strip()
        if len(text) < min_chars or text in seen:
            return
        seen.add(text)
        docs.append(Doc(doc.name, text))

    for key in sorted(topics):
        add(Doc("", topics[key]))
    visited: set[int] = set()
    for module in iter_stdlib_modules():
        for doc in _module_docs(module, visited):
            add(doc)
    return docs


def _stable_fraction(text: str) -> float:
    """A number in [0, 1) derived from ``text`` alone (unlike ``hash``, stable across runs)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def chat_examples(docs: list[Doc], fraction: float, max_chars: int) -> list[list[dict[str, str]]]:
    """One-turn chats ("What does json.dumps do?" -> its docstring) for a share of docstrings."""
    conversations = []
    for doc in docs:
        if not doc.name or len(doc.text) > max_chars or _stable_fraction(doc.name) >= fraction:
            continue
        conversations.append(
            [
                {"role": "user", "content": f"What does {doc.name} do?"},
                {"role": "assistant", "content": doc.text},
            ]
        )
    return conversations


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE whose encoding prepends bos; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tokenizer


def save_tokenizer(tokenizer: Any, out_dir: Path, max_length: int) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that ``AutoTokenizer`` can load."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "added_tokens_decoder": added,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def encode_stream(tokenizer: Any, texts: list[str], bos_id: int, eos_id: int) -> torch.Tensor:
    """Pack texts into one stream ``bos t1 eos bos t2 eos ...``.

    Texts that already start with bos (rendered chat conversations) are not given a second one.
    """
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        if not enc.ids or enc.ids[0] != bos_id:
            ids.append(bos_id)
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def random_batch(
    stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator
) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens from ``stream``; train on ``[:, :-1]``."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=gen)
    offsets = torch.arange(seq_len + 1)
    return stream[starts[:, None] + offsets[None, :]]


def lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up for ``warmup`` steps, then a cosine from 1 to ``min_ratio`` over progress."""
    if step < warmup:
        return (step + 1) / warmup
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return min_ratio + (1.0 - min_ratio) * cosine


def autocast_enabled(mode: str) -> bool:
    """Resolve ``--autocast``: ``auto`` uses bfloat16 where the CPU supports it natively."""
    if mode == "off":
        return False
    if mode == "bf16":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def evaluate(
    model: Any, stream: torch.Tensor, args: argparse.Namespace, use_bf16: bool, batches: int
) -> float:
    """Mean loss over ``batches`` fixed random batches of ``stream``."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(batches):
        chunk = random_batch(stream, args.batch_size, args.seq_len, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            losses.append(model(input_ids=chunk[:, :-1], labels=chunk[:, :-1]).loss.item())
    model.train()
    return sum(losses) / len(losses)


@dataclass
class TrainResult:
    """Figures for the model card."""

    steps: int
    tokens: int
    seconds: float
    final_loss: float
    val_loss: float


def train(
    model: Any,
    train_stream: torch.Tensor,
    val_stream: torch.Tensor,
    args: argparse.Namespace,
    use_bf16: bool,
) -> TrainResult:
    """AdamW + warm-up + cosine on random windows until the step or time budget runs out."""
    from tqdm import tqdm

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    budget_s = args.max_minutes * 60.0
    recent: list[float] = []
    start = time.monotonic()
    step = 0
    model.train()
    # The bar tracks the schedule's progress (steps or wall-clock time, whichever leads), in %.
    bar = tqdm(
        total=100.0,
        dynamic_ncols=True,
        mininterval=2.0,
        bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}",
    )
    while step < args.max_steps:
        elapsed = time.monotonic() - start
        if budget_s > 0 and elapsed >= budget_s:
            break
        progress = step / args.max_steps
        if budget_s > 0:
            progress = max(progress, elapsed / budget_s)
        lr = args.lr * lr_factor(progress, step, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        chunk = random_batch(train_stream, args.batch_size, args.seq_len, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            # HF shifts the labels inside the loss, so the labels are the inputs themselves.
            loss = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        recent.append(loss.item())
        recent = recent[-args.log_every :]
        done = step / args.max_steps
        if budget_s > 0:
            done = max(done, (time.monotonic() - start) / budget_s)
        bar.set_postfix(step=step, loss=f"{recent[-1]:.3f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(min(100.0, 100.0 * done) - bar.n)
        if step % args.log_every == 0:
            mean = sum(recent) / len(recent)
            minutes = (time.monotonic() - start) / 60
            bar.write(f"step {step:6d}  loss {mean:.4f}  lr {lr:.2e}  {minutes:5.1f} min")
    bar.close()
    seconds = time.monotonic() - start
    final_loss = sum(recent) / max(len(recent), 1)
    val_loss = evaluate(model, val_stream, args, use_bf16, args.eval_batches)
    tokens = step * args.batch_size * args.seq_len
    print(f"trained {step} steps ({tokens:,} tokens) in {seconds / 60:.1f} min")
    print(f"final train loss (mean of last {len(recent)} steps) {final_loss:.4f}")
    print(f"validation loss {val_loss:.4f}")
    return TrainResult(step, tokens, seconds, final_loss, val_loss)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def save_model(model: Any, out_dir: Path, dtype: torch.dtype, eos_ids: list[int]) -> None:
    """``save_pretrained`` in ``dtype``, then add the legacy config keys older readers expect."""
    from transformers import GenerationConfig

    model.to(dtype)
    model.save_pretrained(out_dir)
    (out_dir / "model.safetensors").chmod(0o644)  # written via a private temporary file
    dtype_name = str(dtype).removeprefix("torch.")
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = dtype_name
    config["dtype"] = dtype_name
    config.setdefault("rope_theta", model.config.rope_parameters["rope_theta"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    generation.save_pretrained(out_dir)


def greedy_samples(out_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Reload the saved checkpoint in float32 and return greedy continuations of ``prompts``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1] :]))
    return outputs


def write_model_card(
    out_dir: Path,
    args: argparse.Namespace,
    command: str,
    stats: dict[str, Any],
    result: TrainResult,
    samples: list[tuple[str, str]],
) -> None:
    """Write ``README.md``: what the model is, how it was trained, how to rebuild it."""
    head_dim = args.hidden_size // args.heads
    sample_lines = "\n".join(f"{prompt!r} -> {text!r}" for prompt, text in samples)
    card = f"""# mgpu demo model

A tiny Llama-architecture language model (`LlamaForCausalLM`, {stats["params"]:,} parameters)
trained from scratch on CPU, bundled with mgpu so that examples, the CLI and the tests can run a
real Hugging Face checkpoint offline. **It is a toy for demos and tests, not a useful assistant**:
it has picked up some English phrasing from the Python documentation and little else.

## Architecture

| setting | value |
|---|---|
| hidden size | {args.hidden_size} |
| layers | {args.layers} |
| query / key-value heads | {args.heads} / {args.kv_heads} (GQA, head dim {head_dim}) |
| MLP | SwiGLU, intermediate size {args.intermediate_size} |
| vocabulary | {stats["vocab"]} (byte-level BPE) |
| positions | RoPE, theta 10000, max {args.max_positions} |
| embeddings | tied input/output |
| weights | {args.save_dtype}, one `model.safetensors` |

Special tokens: `{BOS}` (bos), `{EOS}` (eos, pad), `{IM_START}`, `{IM_END}`.
`tokenizer_config.json` has a ChatML-style chat template
(`<|im_start|>role\\n...<|im_end|>\\n`); generation stops at `{EOS}` or `{IM_END}`.

## Training data

Text shipped with every Python installation (Python {platform.python_version()} here):
the documentation topics of `pydoc_data.topics` plus the docstrings of standard-library modules,
classes, functions and methods, deduplicated: {stats["docs"]:,} documents,
{stats["chars"] / 1e6:.1f} MB of text, {stats["train_tokens"]:,} training tokens
(+{stats["val_tokens"]:,} held out). {stats["chat"]:,} docstrings were also rendered as one-turn
chat conversations ("What does json.dumps do?").

## Training

AdamW (peak lr {args.lr:g}, betas 0.9/0.95, weight decay {args.weight_decay:g}),
{args.warmup_steps} warm-up steps, cosine decay to {args.min_lr_ratio:g} of the peak,
batch {args.batch_size} x {args.seq_len} tokens, gradient clipping 1.0, seed {args.seed},
bfloat16 autocast: {stats["bf16"]}; one CPU thread.
{result.steps:,} steps ({result.tokens:,} tokens) in {result.seconds / 60:.1f} minutes.

- final training loss (mean of the last {args.log_every} steps): **{result.final_loss:.3f}**
- held-out loss: **{result.val_loss:.3f}**

Rebuild (from the repository root; about {args.max_minutes:g} minutes):

```
{command}
```

## Greedy samples

```
{sample_lines}
```
"""
    (out_dir / "README.md").write_text(card)


def dir_size(path: Path) -> int:
    """Total size in bytes of the files directly in ``path``."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the settings of the bundled model."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--min-doc-chars", type=int, default=40, help="drop shorter docstrings")
    p.add_argument("--chat-fraction", type=float, default=0.1, help="docstrings also as chats")
    p.add_argument("--chat-max-chars", type=int, default=1500, help="longest chat answer")
    p.add_argument("--val-every", type=int, default=100, help="hold out one document in N")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768, help="SwiGLU width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA)")
    p.add_argument("--max-positions", type=int, default=1024, help="max_position_embeddings")
    p.add_argument("--seq-len", type=int, default=256, help="training window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=100_000, help="step budget")
    p.add_argument("--max-minutes", type=float, default=15.0, help="training time, 0: no limit")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="print the mean loss every N steps")
    p.add_argument("--eval-batches", type=int, default=20, help="batches for the held-out loss")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-size-mb", type=float, default=25.0, help="fail above this output size")
    p.add_argument("--sample-tokens", type=int, default=40, help="tokens per greedy sample")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the corpus, tokenizer and model, train, save, and print greedy samples."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = shlex.join(["python", "scripts/train_demo_model.py", *sys.argv[1:]])
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    docs = build_corpus(args.min_doc_chars)
    chars = sum(len(d.text) for d in docs)
    print(f"corpus: {len(docs):,} documents, {chars / 1e6:.2f} MB ({time.monotonic() - t0:.0f} s)")

    tokenizer = train_tokenizer([d.text for d in docs], args.vocab_size)
    save_tokenizer(tokenizer, out_dir, args.max_positions)
    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    conversations = chat_examples(docs, args.chat_fraction, args.chat_max_chars)
    chats = [hf_tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    texts = [d.text for d in docs] + chats
    val_texts = texts[:: args.val_every]
    train_texts = [t for i, t in enumerate(texts) if i % args.val_every]
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    im_end_id = tokenizer.token_to_id(IM_END)
    train_stream = encode_stream(tokenizer, train_texts, bos_id, eos_id)
    val_stream = encode_stream(tokenizer, val_texts, bos_id, eos_id)
    print(
        f"tokenizer: {tokenizer.get_vocab_size()} tokens; {len(chats)} chat examples; "
        f"{train_stream.numel():,} train / {val_stream.numel():,} held-out tokens "
        f"({chars / (train_stream.numel() + val_stream.numel()):.2f} chars/token)"
    )

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=[eos_id, im_end_id],
        pad_token_id=eos_id,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    use_bf16 = autocast_enabled(args.autocast)
    print(f"model: {n_params:,} parameters; bfloat16 autocast {use_bf16}; {args.threads} thread(s)")

    result = train(model, train_stream, val_stream, args, use_bf16)

    save_dtype = torch.float32 if args.save_dtype == "float32" else torch.bfloat16
    save_model(model, out_dir, save_dtype, [eos_id, im_end_id])
    texts_out = greedy_samples(out_dir, SAMPLE_PROMPTS, args.sample_tokens)
    samples = list(zip(SAMPLE_PROMPTS, texts_out, strict=True))
    stats = {
        "params": n_params,
        "vocab": tokenizer.get_vocab_size(),
        "docs": len(docs),
        "chars": chars,
        "chat": len(chats),
        "train_tokens": train_stream.numel(),
        "val_tokens": val_stream.numel(),
        "bf16": "yes" if use_bf16 else "no",
    }
    write_model_card(out_dir, args, command, stats, result, samples)

    size = dir_size(out_dir)
    print(f"\nsaved to {out_dir} ({size / 1e6:.1f} MB)")
    for name in sorted(p.name for p in out_dir.iterdir()):
        print(f"  {name}")
    print("\ngreedy samples:")
    for prompt, text in samples:
        print(f"  {prompt!r} -> {text!r}")
    if size > args.max_size_mb * 1e6:
        raise SystemExit(f"output is {size / 1e6:.1f} MB, above --max-size-mb {args.max_size_mb}")


if __name__ == "__main__":
    main()
