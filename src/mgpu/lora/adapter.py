"""PEFT LoRA adapter directories: parsing ``--lora-modules``, reading and validating adapters.

An adapter is what ``peft`` saves (and ``mgpu train`` writes): ``adapter_config.json`` and
``adapter_model.safetensors``. A pickled ``adapter_model.bin`` is refused, never unpickled. Every
check that can fail runs in the engine process before a worker starts, from the safetensors header
alone: the target modules exist in the model, each tensor has the shape of the layer it wraps, the
rank is at most ``--max-lora-rank``.

PEFT names a tensor after the HF module it wraps::

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   (out, r)

and the delta it adds is ``scaling * x A^T B^T`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)``
with rsLoRA).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mgpu.config import ModelConfig
from mgpu.errors import ConfigError
from mgpu.layers.linear import LinearBase
from mgpu.layers.moe import expert_parallel

logger = logging.getLogger("mgpu.lora")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

#: ``[base_model.model.]<HF module>.lora_<A|B>[.<adapter name>].weight``
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)


class LoRAError(ConfigError):
    """An adapter that cannot be served with this model and these settings."""


@dataclass(frozen=True)
class LoRAModule:
    """One ``--lora-modules`` entry: the name clients put in ``model``, and the adapter directory.

    Attributes:
        name: the served name (listed in ``/v1/models``, picked by a request's ``model``).
        path: the PEFT adapter directory.
        base_model_name: the base model the adapter claims (vLLM's JSON form), if given.
    """

    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, spec: str | dict | LoRAModule) -> LoRAModule:
        """One entry in vLLM's forms: ``name=path``, or JSON ``{"name": ..., "path": ...}``.

        Args:
            spec: the flag's text, a dict of the JSON form, or a ready entry.
        """
        if isinstance(spec, LoRAModule):
            return spec
        if isinstance(spec, str) and spec.lstrip().startswith("{"):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise LoRAError(f"--lora-modules entry {spec!r} is not valid JSON: {exc}") from None
        if isinstance(spec, dict):
            unknown = set(spec) - {"name", "path", "base_model_name"}
            if unknown or "name" not in spec or "path" not in spec:
                extra = f"; unknown keys: {', '.join(sorted(unknown))}" if unknown else ""
                raise LoRAError(
                    f"--lora-modules JSON entry {spec!r} needs 'name' and 'path' (and optionally "
                    f"'base_model_name'){extra}"
                )
            return cls(str(spec["name"]), str(spec["path"]), spec.get("base_model_name"))
        name, sep, path = str(spec).partition("=")
        if not sep or not name or not path:
            raise LoRAError(
                f'--lora-modules entry {spec!r} is not name=path or {{"name": ..., "path": ...}}'
            )
        return cls(name, path)


@dataclass
class LoRAConfig:
    """The LoRA settings of an engine.

    Attributes:
        modules: the adapters, in ``--lora-modules`` order (adapter id ``i + 1``; 0 is the base).
        max_loras: adapters one batch may use, i.e. device slots of stacked A/B weights.
        max_lora_rank: rank of every slot (adapters of a lower rank are zero-padded).
    """

    modules: list[LoRAModule]
    max_loras: int = 1
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise LoRAError(f"--max-loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise LoRAError(f"--max-lora-rank must be >= 1, got {self.max_lora_rank}")
        names = [m.name for m in self.modules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise LoRAError(f"--lora-modules names must be unique; repeated: {', '.join(dup)}")

    @property
    def ids(self) -> dict[str, int]:
        """Served name -> adapter id (1-based; 0 is the base model)."""
        return {m.name: i + 1 for i, m in enumerate(self.modules)}


@dataclass
class AdapterInfo:
    """An adapter checked against the model: what the workers need to load it.

    Attributes:
        name: served name.
        path: adapter directory.
        rank: LoRA rank r.
        scaling: factor of the delta (``lora_alpha / r``, rsLoRA ``lora_alpha / sqrt(r)``).
        tensors: HF module name -> (lora_A key, lora_B key) in the safetensors file.
        base_model: the base model named in ``adapter_config.json``.
    """

    name: str
    path: Path
    rank: int
    scaling: float
    tensors: dict[str, tuple[str, str]] = field(default_factory=dict)
    base_model: str | None = None


def lora_targets(model_cls: type, config: ModelConfig) -> dict[str, tuple[str, int, int, int]]:
    """Every HF linear module a LoRA adapter may wrap, with the local module serving it.

    Each decoder layer is built on the meta device (no memory, TP 1: full shapes), as the loader's
    strict name check does.

    Returns:
        HF module name (``model.layers.0.self_attn.q_proj``) -> (local module name, fused output
        index, input width, output width).
    """
    targets: dict[str, tuple[str, int, int, int]] = {}
    packed = model_cls.packed_modules
    with torch.device("meta"), expert_parallel(False):
        for i in range(config.num_hidden_layers):
            layer: nn.Module = model_cls.make_layer(config, i)
            for local, module in layer.named_modules():
                if not isinstance(module, LinearBase):
                    continue
                prefix, _, leaf = f"model.layers.{i}.{local}".rpartition(".")
                parts = packed.get(leaf, [(leaf, 0)])
                for hf_leaf, shard in parts:
                    targets[f"{prefix}.{hf_leaf}"] = (
                        f"layers.{i}.{local}",
                        shard,
                        module.input_size,
                        module.output_sizes[shard],
                    )
    return targets


def check_lora(
    config: ModelConfig,
    model_name: str,
    enable_lora: bool,
    modules: Sequence[str | dict | LoRAModule] | None,
    max_loras: int,
    max_lora_rank: int,
) -> tuple[LoRAConfig | None, list[AdapterInfo]]:
    """Every check a start runs on the LoRA flags before a worker starts (``mgpu serve`` and
    ``--dry-run`` alike): the flags agree, the entries parse, each adapter fits the model.

    Args:
        config: the base model's architecture.
        model_name: the base model's path or id, for the mismatch messages.
        enable_lora: ``--enable-lora``.
        modules: ``--lora-modules`` entries.
        max_loras: ``--max-loras``.
        max_lora_rank: ``--max-lora-rank``.

    Returns:
        The LoRA settings and each adapter checked, or (None, []) without LoRA.
    """
    from mgpu.models.registry import model_class

    if not enable_lora:
        if modules:
            raise LoRAError("--lora-modules needs --enable-lora (vLLM's rule)")
        return None, []
    if not modules:
        raise LoRAError(
            "--enable-lora without --lora-modules would serve no adapter: mgpu loads "
            "adapters at start only (there is no runtime loading endpoint)"
        )
    lora_config = LoRAConfig([LoRAModule.parse(m) for m in modules], max_loras, max_lora_rank)
    cls = model_class(config)
    adapters = [
        read_adapter(m, cls, config, max_lora_rank, model_name) for m in lora_config.modules
    ]
    for info in adapters:
        logger.info("LoRA adapter %r: rank %d, %d modules", info.name, info.rank, len(info.tensors))
    return lora_config, adapters


def check_served_names(adapter_names: Iterable[str], model_names: Iterable[str]) -> None:
    """Refuse an adapter named like the served model: requests for it would reach the base model.

    Args:
        adapter_names: the ``--lora-modules`` names.
        model_names: the names the base model answers to (``--served-model-name``, aliases).
    """
    clash = sorted(set(adapter_names) & set(model_names))
    if clash:
        raise LoRAError(
            f"LoRA adapter name '{clash[0]}' is also the served model's name: requests for "
            "it would reach the base model; rename the adapter in --lora-modules or set "
            "--served-model-name"
        )


def read_adapter(
    module: LoRAModule,
    model_cls: type,
    config: ModelConfig,
    max_lora_rank: int,
    model_name: str,
) -> AdapterInfo:
    """Read and validate one adapter directory (its config and safetensors header only).

    Args:
        module: the ``--lora-modules`` entry.
        model_cls: the model's architecture class (its packed modules and layers).
        config: the base model's architecture.
        max_lora_rank: ``--max-lora-rank``.
        model_name: the base model's path or id, for the mismatch messages.
    """
    path = Path(module.path).expanduser()
    what = f"LoRA adapter {module.name!r} ({path})"
    if not path.is_dir():
        raise LoRAError(f"{what}: not a directory")
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise LoRAError(f"{what}: no {CONFIG_FILE} (a PEFT adapter directory has one)")
    if not weights.is_file():
        extra = " (adapter_model.bin is pickled and never loaded: save with safetensors)"
        raise LoRAError(
            f"{what}: no {WEIGHTS_FILE}{extra if (path / 'adapter_model.bin').exists() else ''}"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoRAError(f"{what}: cannot read {CONFIG_FILE}: {exc}") from None
    _check_config(cfg, what)
    rank = int(cfg["r"])
    if rank > max_lora_rank:
        raise LoRAError(
            f"{what} has rank {rank}, above --max-lora-rank {max_lora_rank}; "
            f"start with --max-lora-rank {rank} or more"
        )
    alpha = float(cfg.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    base = cfg.get("base_model_name_or_path") or module.base_model_name
    targets = lora_targets(model_cls, config)
    info = AdapterInfo(module.name, path, rank, scaling, base_model=base)
    pairs: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                match = _KEY.match(key)
                if match is None:
                    raise LoRAError(
                        f"{what}: tensor {key!r} is not a LoRA A/B weight mgpu can serve"
                    )
                shape = tuple(f.get_slice(key).get_shape())
                pairs.setdefault(match["module"], {})[match["ab"]] = (key, shape)
    except LoRAError:
        raise
    except Exception as exc:
        raise LoRAError(f"{what}: cannot read {WEIGHTS_FILE}: {exc}") from None
    if not pairs:
        raise LoRAError(f"{what}: {WEIGHTS_FILE} holds no LoRA weights")
    hint = f" (the adapter was trained on {base!r}, this server runs {model_name!r})"
    for hf_module, ab in sorted(pairs.items()):
        if hf_module not in targets:
            leaf = hf_module.rpartition(".")[2]
            known = sorted({t.rpartition(".")[2] for t in targets})
            raise LoRAError(
                f"{what} targets {hf_module!r}, which this model does not have as a linear "
                f"layer mgpu can wrap (LoRA targets: {', '.join(known)})"
                + (hint if leaf in known else "")
            )
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{what}: {hf_module} has lora_{next(iter(ab))} without its pair")
        _, _, in_size, out_size = targets[hf_module]
        (key_a, shape_a), (key_b, shape_b) = ab["A"], ab["B"]
        if shape_a != (rank, in_size) or shape_b != (out_size, rank):
            raise LoRAError(
                f"{what}: {hf_module} has lora_A {shape_a} and lora_B {shape_b}, expected "
                f"{(rank, in_size)} and {(out_size, rank)} for r={rank} on this model{hint}"
            )
        info.tensors[hf_module] = (key_a, key_b)
    if base and base != model_name and Path(base).name != Path(model_name).name:
        logger.warning(
            "%s was trained on %r; serving it on %r (shapes match)", what, base, model_name
        )
    return info


def _check_config(cfg: dict, what: str) -> None:
    """Refuse adapter settings whose delta is not ``scaling * x A^T B^T`` on linear layers."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(
            f"{what}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are served"
        )
    if "r" not in cfg:
        raise LoRAError(f"{what}: {CONFIG_FILE} has no rank 'r'")
    refused = {
        "use_dora": "DoRA adapters",
        "rank_pattern": "per-module ranks (rank_pattern)",
        "alpha_pattern": "per-module alphas (alpha_pattern)",
        "modules_to_save": "fully trained modules (modules_to_save)",
    }
    for key, why in refused.items():
        if cfg.get(key):
            raise LoRAError(f"{what}: {why} are not served; merge it with mgpu merge instead")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"{what}: trained biases (bias={cfg['bias']!r}) are not served")
