"""``mgpu plan``: will a model fit these GPUs, how to split it, how fast it will run.

One module per idea: ``models`` (HF directories, GGUF files, the catalogue), ``quant`` (bits per
weight), ``hardware`` (GPU catalogue, ``--gpus``, NVML, interconnects), ``engines`` (what each
engine can do), ``placement`` (layouts and per-GPU memory through :mod:`mgpu.memory`), ``speed`` and
``calibration`` (the speed model and its fit to published measurements), ``plan`` (the answer),
``power``, ``commands``, ``recommend``, ``train``, ``render``, ``plot`` and ``cli``. The formulas
are written up in docs/planner.md.
"""
