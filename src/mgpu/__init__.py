"""mgpu: run large language models across several devices.

The offline API mirrors vLLM's::

    from mgpu import LLM, SamplingParams
    with LLM(model="path/to/model", tensor_parallel_size=2, device="cpu") as llm:
        out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
        print(out[0].outputs[0].text)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):  # lazy: `import mgpu` stays cheap for the CLI and the planner
    if name == "LLM":
        from mgpu.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from mgpu.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
