"""Ollama model names, resolved the way ``ollama pull`` resolves them.

An Ollama name is ``[library/]model[:tag]``. A missing tag means ``latest``; a tag that names a
size but no quantization (``70b``, ``70b-instruct``) is an alias of the quantized tag Ollama ships
as that size's default (``70b-instruct-q4_K_M`` for ``llama3.3:70b``; older models default to
``q4_0``); a tag with a quantization (``70b-instruct-q8_0``, ``70b-instruct-fp16``) is that file.
The defaults and the size ``latest`` points to are recorded per catalogue entry in
``data/models.json`` (``ollama_default``), each with the tags page it was read from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mgpu.errors import ConfigError
from mgpu.planner.models import CatalogueEntry, catalogue
from mgpu.planner.quant import find_quantization_tag

_PREFIXES = ("https://", "http://", "registry.ollama.ai/", "ollama.com/", "library/")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9][a-z0-9._-]*)?$")


@dataclass(frozen=True)
class OllamaPull:
    """What an Ollama name pulls: the catalogue model, the precision and the full tag."""

    entry: CatalogueEntry
    tag: str
    quantization: str
    is_default: bool
    source: str

    def describe(self) -> str:
        """One sentence for the plan's reasons."""
        if self.is_default:
            return (
                f"Ollama would pull {self.tag}: with no quantization in the tag Ollama takes its "
                f"default for this model, {self.quantization} ({self.source})."
            )
        return f"Ollama would pull {self.tag} ({self.quantization}, as the tag says)."


def _library() -> dict[str, list[CatalogueEntry]]:
    """Catalogue entries by Ollama library name (``llama3.3`` -> [Llama-3.3-70B-Instruct])."""
    names: dict[str, list[CatalogueEntry]] = {}
    for entry in catalogue():
        if entry.ollama and entry.ollama_default:
            names.setdefault(entry.ollama.split(":")[0], []).append(entry)
    return names


def _size(entry: CatalogueEntry) -> str:
    return str(entry.ollama).split(":", 1)[1]


def resolve_ollama_name(text: str) -> OllamaPull | None:
    """Resolve ``text`` as an Ollama name, or return None when it is not one.

    Args:
        text: ``llama3.3``, ``llama3.3:70b``, ``llama3.3:70b-instruct-q8_0``, ``library/qwq``.

    Raises:
        ConfigError: for an Ollama model the catalogue holds, with a size or ``latest`` it lacks.
    """
    name = text.strip()
    for prefix in _PREFIXES:
        if name.lower().startswith(prefix):
            name = name[len(prefix) :]
    if not _NAME.match(name.lower()):
        return None
    model, _, tag = name.partition(":")
    model = model.lower()
    entries = _library().get(model)
    if entries is None:
        return None
    sizes = ", ".join(f"{model}:{_size(e)}" for e in entries)
    if tag in ("", "latest"):
        latest = [e for e in entries if e.ollama_default and e.ollama_default["latest"]]
        if not latest:
            raise ConfigError(
                f"Ollama's {model}:latest is a size the catalogue does not hold; name one: {sizes}"
            )
        entry, tag = latest[0], ""
    else:
        size = tag.split("-", 1)[0].lower()
        matches = [e for e in entries if _size(e) == size]
        if not matches:
            raise ConfigError(f"the catalogue has no {model}:{size}; it has {sizes}")
        entry = matches[0]
    default = entry.ollama_default or {}
    default_tag = str(default["tag"])
    implied, _ = find_quantization_tag(tag)
    if implied is None:
        quantization, _ = find_quantization_tag(default_tag)
        if quantization is None:
            raise ValueError(f"models.json: {entry.name}'s Ollama default {default_tag} is bare")
        return OllamaPull(entry, f"{model}:{default_tag}", quantization, True, default["source"])
    return OllamaPull(entry, f"{model}:{tag}", implied, False, default["source"])
