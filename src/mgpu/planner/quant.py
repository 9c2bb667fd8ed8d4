"""Weight precisions: bits per weight, format family, and how people spell them.

Bits per weight include the per-block scales, because those are read from memory with the weights:

- GGUF block formats, from llama.cpp's block definitions (``ggml/src/ggml-common.h``): ``q8_0``
  stores 32 int8 values and one fp16 scale (34 bytes / 32 weights = 8.5 bits), ``q4_0`` 32 nibbles
  and one fp16 scale (18 / 32 = 4.5), ``q4_1``/``q5_0``/``q5_1`` likewise 5.0/5.5/6.0, ``q6_k`` a
  210-byte super-block of 256 weights (6.5625).
- GGUF "K-quant mixes" (``q4_k_m`` ...) use a higher type for some tensors (attn_v, ffn_down, the
  output matrix), so their effective rate is the one llama.cpp's ``tools/quantize/README.md``
  reports for Llama 2 7B: q2_k 3.35, q3_k_m 3.91, q4_k_s 4.58, q4_k_m 4.84, q5_k_s 5.52,
  q5_k_m 5.68.
- GPTQ and AWQ int4 with group size 128: 4 bits plus an fp16 scale and a packed 4-bit zero point per
  group of 128 (4 + 20/128 = 4.156).
- Plain ``int4`` (gpt-fast/torchao weight-only, group size 128, bf16 scale and zero):
  4 + 32/128 = 4.25.
- ``nf4`` (bitsandbytes, QLoRA): blocks of 64 with an 8-bit scale, itself scaled in fp32 per 256
  blocks: 4 + 8/64 + 32/16384 = 4.127.
- ``int8`` and ``fp8``: 8 bits; the per-channel or per-tensor scales are under 0.01 bit.
- ``exl2-<bits>``: ExLlamaV2's own target rate, which already averages its mixed-precision layers.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from mgpu.errors import ConfigError

#: Families group formats whose kernels behave alike; the speed model calibrates one bandwidth
#: efficiency per engine and family.
FAMILIES = ("float", "fp8", "int8", "gguf", "int4", "exl2")


@dataclass(frozen=True)
class QuantFormat:
    """One weight precision."""

    name: str
    bits_per_weight: float
    family: str
    vllm_name: str | None
    description: str

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown format family {self.family!r}")

    @property
    def is_gguf(self) -> bool:
        """Whether llama.cpp loads this precision natively (a GGUF file of this type)."""
        return self.family == "gguf" or self.name in ("f32", "f16", "bf16")


_FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat("f32", 32.0, "float", None, "32-bit float"),
    QuantFormat("bf16", 16.0, "float", None, "bfloat16"),
    QuantFormat("f16", 16.0, "float", None, "float16"),
    QuantFormat("fp8", 8.0, "fp8", "fp8", "8-bit float (E4M3) weights with per-tensor scales"),
    QuantFormat("int8", 8.0, "int8", None, "8-bit integer weight-only, per-channel scales"),
    QuantFormat("int4", 4.25, "int4", None, "4-bit weight-only, group 128, bf16 scale and zero"),
    QuantFormat("gptq-int4", 4.156, "int4", "gptq", "GPTQ 4-bit, group 128"),
    QuantFormat("awq-int4", 4.156, "int4", "awq", "AWQ 4-bit, group 128"),
    QuantFormat("nf4", 4.127, "int4", "bitsandbytes", "bitsandbytes NF4, double-quantised (QLoRA)"),
    QuantFormat("q8_0", 8.5, "gguf", None, "GGUF Q8_0: 32 int8 + fp16 scale per block"),
    QuantFormat("q6_k", 6.5625, "gguf", None, "GGUF Q6_K: 210 bytes per 256 weights"),
    QuantFormat("q5_k_m", 5.68, "gguf", None, "GGUF Q5_K_M mix (llama.cpp quantize README)"),
    QuantFormat("q5_k_s", 5.52, "gguf", None, "GGUF Q5_K_S mix (llama.cpp quantize README)"),
    QuantFormat("q5_1", 6.0, "gguf", None, "GGUF Q5_1: 24 bytes per 32 weights"),
    QuantFormat("q5_0", 5.5, "gguf", None, "GGUF Q5_0: 22 bytes per 32 weights"),
    QuantFormat("q4_k_m", 4.84, "gguf", None, "GGUF Q4_K_M mix (llama.cpp quantize README)"),
    QuantFormat("q4_k_s", 4.58, "gguf", None, "GGUF Q4_K_S mix (llama.cpp quantize README)"),
    QuantFormat("q4_1", 5.0, "gguf", None, "GGUF Q4_1: 20 bytes per 32 weights"),
    QuantFormat("q4_0", 4.5, "gguf", None, "GGUF Q4_0: 18 bytes per 32 weights"),
    QuantFormat("q3_k_m", 3.91, "gguf", None, "GGUF Q3_K_M mix (llama.cpp quantize README)"),
    QuantFormat("q2_k", 3.35, "gguf", None, "GGUF Q2_K mix (llama.cpp quantize README)"),
)
FORMATS: dict[str, QuantFormat] = {f.name: f for f in _FORMATS}

_ALIASES = {
    "fp32": "f32",
    "float32": "f32",
    "float": "f32",
    "fp16": "f16",
    "float16": "f16",
    "half": "f16",
    "bfloat16": "bf16",
    "fp8_e4m3": "fp8",
    "float8": "fp8",
    "w8a16": "int8",
    "int4-weight-only": "int4",
    "gptq": "gptq-int4",
    "gptq-4bit": "gptq-int4",
    "awq": "awq-int4",
    "awq-4bit": "awq-int4",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
    "q3_k": "q3_k_m",
}

_EXL2 = re.compile(r"^exl2[-_ ]?(\d+(?:\.\d+)?)(?:bpw|b)?$")

#: KV-cache element sizes; GGUF q8_0/q4_0 caches carry their block scales like the weights do.
KV_CACHE_BYTES: dict[str, float] = {"auto": 2.0, "f16": 2.0, "bf16": 2.0, "fp8": 1.0}
KV_CACHE_BYTES.update({"q8_0": 8.5 / 8, "q4_0": 4.5 / 8})


def parse_quantization(text: str) -> QuantFormat:
    """Turn a precision as people write it (``Q4_K_M``, ``fp16``, ``exl2-4.65bpw``) into a format.

    Args:
        text: the name.

    Raises:
        ConfigError: for an unknown name, listing the closest known ones.
    """
    key = text.strip().lower().replace(" ", "")
    # People mix "-" and "_" freely (Q4-K-M, gptq_int4); try the spelling as given and both swaps.
    for spelling in (key, key.replace("-", "_"), key.replace("_", "-")):
        canonical = _ALIASES.get(spelling, spelling)
        if canonical in FORMATS:
            return FORMATS[canonical]
    match = _EXL2.match(key)
    if match:
        bits = float(match.group(1))
        if not 2.0 <= bits <= 8.0:
            raise ConfigError(f"EXL2 rate {bits} bits per weight is outside ExLlamaV2's 2-8 range")
        return QuantFormat(f"exl2-{bits:g}", bits, "exl2", None, f"ExLlamaV2 at {bits:g} bpw")
    known = [*FORMATS, "exl2-<bits>"]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown quantization {text!r}.{hint} Known: {', '.join(known)} "
        "(exl2 takes its bits per weight, e.g. exl2-4.65)."
    )


# Longest spellings first, so that "q4_k_m" wins over "q4_k" and "gptq-int4" over "int4".
_TAG = re.compile(
    r"(?<![a-z0-9])("
    r"exl2[-_]?\d+(?:\.\d+)?(?:bpw)?|gptq(?:[-_]int4|[-_]4bit)?|awq(?:[-_]int4|[-_]4bit)?|"
    r"q[2-8]_k_[sml]|q[2-8]_k|q[458]_[01]|"
    r"fp8|int8|int4|bf16|fp16|f16|fp32|f32"
    r")(?![a-z0-9])"
)


def file_format(name: str, bits: float) -> QuantFormat:
    """The format of a GGUF file: a known precision, or the file's own type at its own rate.

    Args:
        name: the precision the file declares (``q4_k_m``, ``iq4_xs``).
        bits: the file's bits per matrix weight, from its tensor table.
    """
    try:
        return parse_quantization(name)
    except ConfigError:
        return QuantFormat(name, bits, "gguf", None, f"GGUF {name.upper()} (read from the file)")


def find_quantization_tag(text: str) -> tuple[str | None, str]:
    """Find a precision tag inside a model name (``llama3.3:70b-instruct-q4_K_M``).

    Args:
        text: a model name.

    Returns:
        The canonical format name (or None) and the name with the tag removed.
    """
    lowered = text.lower()
    match = _TAG.search(lowered)
    if not match:
        return None, text
    fmt = parse_quantization(match.group(1))
    return fmt.name, lowered[: match.start()] + lowered[match.end() :]


def kv_cache_bytes(name: str) -> float:
    """Bytes per KV-cache element for ``--kv-cache-dtype``.

    Args:
        name: auto, f16, bf16, fp8, q8_0 or q4_0.
    """
    try:
        return KV_CACHE_BYTES[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown --kv-cache-dtype {name!r}; use one of {', '.join(KV_CACHE_BYTES)}"
        ) from None
