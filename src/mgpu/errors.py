"""User-facing errors.

Anything derived from :class:`MgpuError` carries a message written for the person at the keyboard:
what went wrong and what to do. The CLI prints it without a traceback and exits non-zero; the HTTP
server maps it to a proper status code.
"""

from __future__ import annotations


class MgpuError(Exception):
    """Base class of every error mgpu reports to users."""


class ConfigError(MgpuError):
    """An invalid configuration: a bad flag, a layout the model cannot be split into."""


class ModelLoadError(MgpuError):
    """The model cannot be found, or its files are wrong (a missing, unexpected or bad tensor)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not one mgpu implements."""


class WorkerError(MgpuError):
    """A worker process died or raised; the engine is no longer usable."""
