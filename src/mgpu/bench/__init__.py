"""``mgpu bench``: a load generator for any OpenAI-compatible server (mgpu, vLLM, llama.cpp,
Ollama).

:mod:`~mgpu.bench.workload` builds the requests, :mod:`~mgpu.bench.client` sends one and times its
stream, :mod:`~mgpu.bench.runner` drives a load level, :mod:`~mgpu.bench.report` turns the timings
into the numbers, tables, files and plots, and :mod:`~mgpu.bench.local` starts ``mgpu serve`` per
layout for ``--local --sweep``.
"""
