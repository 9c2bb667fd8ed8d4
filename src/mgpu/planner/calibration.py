"""Calibrating the speed model against published measurements, and validating it.

The measurements are the rows of ``measured_speeds.csv`` marked usable for single-stream validation
(batch-1 decode on ``gpu_count`` copies of one GPU, known precision). Each row is turned into the
same layout the planner would build and costed with :func:`mgpu.planner.speed.step_cost`; the fit
then chooses the constants of the speed model (see :mod:`mgpu.planner.speed`):

- ``a[engine/format]`` >= 1, the inverse bandwidth efficiency, one per engine and format family
  that has rows;
- ``c[engine]`` >= 0, the per-layer overhead, for engines with at least
  :data:`MIN_ROWS_FOR_OWN_OVERHEAD` rows; engines with fewer share one pooled value ``c[*]``;
- ``s``, ``h``, ``r`` >= 0: per all-reduce, per stage hand-over and per llama.cpp row-split sync.

Decode time is linear in these constants, so the fit is a non-negative least-squares problem on
relative errors, re-weighted towards least absolute error (so a few suspicious rows, such as the
README's row 101c, cannot drag the rest). Prefill MFU is the median, per engine and format, of what
each row with a prefill figure implies.

Engines and formats without rows borrow: a missing ``a`` is the median over engines of the same
format, a missing ``c`` is ``c[*]``, and ``ik_llama.cpp`` uses llama.cpp's constants.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mgpu.config import ModelConfig
from mgpu.planner.engines import (
    CALIBRATION_PARENT,
    LAYER_SPLIT,
    PIPELINE,
    SINGLE,
    TENSOR,
    EngineProfile,
    get_engine,
)
from mgpu.planner.hardware import Device, find_gpu, make_interconnect
from mgpu.planner.models import ModelSpec, find_catalogue_model
from mgpu.planner.placement import Layout, Workload, make_layout, rank_memory
from mgpu.planner.quant import QuantFormat, parse_quantization
from mgpu.planner.speed import SpeedConstants, StepCost, peak_tflops, step_cost, step_seconds

#: Benchmarks decode from a short prompt (llama-bench tg128, gpt-fast's 200 tokens): the KV cache
#: read is priced at this position, and the fit check holds this much context.
VALIDATION_POSITION = 128
VALIDATION_CONTEXT = 512
MIN_ROWS_FOR_OWN_OVERHEAD = 4
#: An engine gets its own HBM penalty with this many rows on each memory kind.
MIN_ROWS_PER_MEMORY_KIND = 4
POOLED = "*"

_STRATEGY = {"single": SINGLE, "tp": TENSOR, "pp": PIPELINE, "layer-split": LAYER_SPLIT}


@dataclass(frozen=True)
class Measurement:
    """One usable row of measured_speeds.csv."""

    row_id: str
    model: str
    quantization: str
    engine: str
    gpu_count: int
    gpu: str
    interconnect: str
    parallelism: str
    tp: int
    pp: int
    decode_tok_s: float
    prefill_tok_s: float | None
    source: str


def measurements_path() -> Path:
    """The package's copy of measured_speeds.csv."""
    return Path(str(resources.files("mgpu.planner").joinpath("data/measured_speeds.csv")))


def load_measurements(path: Path | None = None) -> list[Measurement]:
    """The rows marked ``usable_for_single_stream_validation = yes``.

    Args:
        path: a measured_speeds.csv; the package's copy when None.
    """
    text = (path or measurements_path()).read_text()
    rows = []
    for row in csv.DictReader(text.splitlines()):
        if row["usable_for_single_stream_validation"].strip() != "yes":
            continue
        rows.append(
            Measurement(
                row_id=row["id"],
                model=row["model"],
                quantization=row["quantization"],
                engine=row["engine"],
                gpu_count=int(row["gpu_count"]),
                gpu=row["gpu"],
                interconnect=row["interconnect"],
                parallelism=row["parallelism"],
                tp=int(row["tp"]),
                pp=int(row["pp"]),
                decode_tok_s=float(row["decode_tok_s"]),
                prefill_tok_s=float(row["prefill_tok_s"]) if row["prefill_tok_s"] else None,
                source=row["source"],
            )
        )
    return rows


@dataclass(frozen=True)
class Case:
    """A measurement rebuilt as a plan: the layout the planner makes for it and its step costs."""

    measurement: Measurement
    model: ModelSpec
    fmt: QuantFormat
    engine: EngineProfile
    layout: Layout
    decode: StepCost
    prefill: StepCost
    prefill_peak_estimated: bool
    fits: bool

    @property
    def group(self) -> str:
        """The efficiency group: engine/format family."""
        return f"{self.engine.name}/{self.fmt.family}"

    @property
    def is_hbm(self) -> bool:
        """The measurement ran on HBM GPUs."""
        return self.layout.devices[0].spec.is_hbm

    @property
    def hardware_class(self) -> str:
        """consumer, workstation or datacenter-hbm (see :class:`~mgpu.planner.hardware.GpuSpec`)."""
        return self.layout.devices[0].spec.hardware_class


def build_case(m: Measurement) -> Case:
    """Rebuild one measurement as the planner would plan it.

    Args:
        m: the measurement.
    """
    entry = find_catalogue_model(m.model)
    model = ModelSpec(entry.name, ModelConfig.from_dict(entry.config), entry.source, entry.hf_id)
    fmt = parse_quantization(m.quantization)
    engine = get_engine(m.engine)
    spec, _ = find_gpu(m.gpu)
    devices = [Device(spec, spec.memory_gib) for _ in range(m.gpu_count)]
    link_name = {"nvlink": "nvlink", "pcie": spec.pcie}.get(m.interconnect)
    link = make_interconnect(link_name, devices)
    strategy = _STRATEGY[m.parallelism]
    if strategy == LAYER_SPLIT:
        strategy = engine.split_strategy
    workload = Workload(VALIDATION_CONTEXT, 1, 2.0)
    bits = fmt.bits_per_weight
    layout = make_layout(strategy, devices, m.tp, m.pp, model.config, bits, engine, workload)
    fits = all(r.free >= 0 for r in rank_memory(model.config, bits, engine, layout, workload))
    decode = step_cost(model.config, bits, engine, layout, link, 1, VALIDATION_POSITION, 2.0)
    chunk = engine.prefill_chunk_tokens
    prefill = step_cost(model.config, bits, engine, layout, link, 1, 0, 2.0, new_tokens=chunk)
    estimated = any(peak_tflops(d.spec)[1] for d in devices)
    return Case(m, model, fmt, engine, layout, decode, prefill, estimated, fits)


@dataclass(frozen=True)
class Calibration:
    """Fitted constants of the speed model and the spread of its errors."""

    inverse_efficiency: dict[str, float]
    layer_overhead_s: dict[str, float]
    allreduce_overhead_s: float
    stage_hop_s: float
    row_split_sync_s: float
    mfu: dict[str, float]
    hbm_penalty: dict[str, float] = field(default_factory=dict)
    """Per engine, what HBM adds to ``a`` (engines measured on both memory kinds)."""
    decode_range: tuple[float, float] = (1.0, 1.0)
    prefill_range: tuple[float, float] = (1.0, 1.0)
    report: dict[str, Any] = field(default_factory=dict)

    def constants(self, engine: str, family: str, mfu: float | None = None) -> SpeedConstants:
        """The constants for one engine and format family, borrowing where there were no rows.

        Args:
            engine: engine name.
            family: format family (see :data:`mgpu.planner.quant.FAMILIES`).
            mfu: use this MFU instead of the calibrated one.
        """
        engine = CALIBRATION_PARENT.get(engine, engine)
        a = _borrow(self.inverse_efficiency, engine, family)
        return SpeedConstants(
            inverse_efficiency=a,
            hbm_inverse_efficiency=a + self.hbm_penalty.get(engine, 0.0),
            layer_overhead_s=self.layer_overhead_s.get(engine, self.layer_overhead_s[POOLED]),
            allreduce_overhead_s=self.allreduce_overhead_s,
            stage_hop_s=self.stage_hop_s,
            row_split_sync_s=self.row_split_sync_s,
            mfu=_borrow(self.mfu, engine, family) if mfu is None else mfu,
        )

    def is_measured(self, engine: str, family: str) -> bool:
        """Whether this engine and format had rows of their own."""
        engine = CALIBRATION_PARENT.get(engine, engine)
        return f"{engine}/{family}" in self.inverse_efficiency

    def to_json(self) -> dict[str, Any]:
        """The stored form (data/calibration.json)."""
        return {
            "about": (
                "Constants of the mgpu planner's speed model, fitted to the usable rows of "
                "measured_speeds.csv by `python scripts/validate_planner.py --fit`. "
                "See docs/planner.md for the formula."
            ),
            "inverse_efficiency": _rounded(self.inverse_efficiency, 4),
            "hbm_penalty": _rounded(self.hbm_penalty, 4),
            "layer_overhead_us": _rounded(
                {k: v * 1e6 for k, v in self.layer_overhead_s.items()}, 2
            ),
            "allreduce_overhead_us": round(self.allreduce_overhead_s * 1e6, 2),
            "stage_hop_us": round(self.stage_hop_s * 1e6, 2),
            "row_split_sync_us": round(self.row_split_sync_s * 1e6, 2),
            "prefill_mfu": _rounded(self.mfu, 4),
            "decode_range": [round(v, 4) for v in self.decode_range],
            "prefill_range": [round(v, 4) for v in self.prefill_range],
            "report": self.report,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Calibration:
        """Read the stored form."""
        return cls(
            inverse_efficiency=dict(raw["inverse_efficiency"]),
            layer_overhead_s={k: v * 1e-6 for k, v in raw["layer_overhead_us"].items()},
            allreduce_overhead_s=raw["allreduce_overhead_us"] * 1e-6,
            stage_hop_s=raw["stage_hop_us"] * 1e-6,
            row_split_sync_s=raw["row_split_sync_us"] * 1e-6,
            mfu=dict(raw["prefill_mfu"]),
            hbm_penalty=dict(raw.get("hbm_penalty", {})),
            decode_range=(raw["decode_range"][0], raw["decode_range"][1]),
            prefill_range=(raw["prefill_range"][0], raw["prefill_range"][1]),
            report=dict(raw.get("report", {})),
        )


def _rounded(values: dict[str, float], digits: int) -> dict[str, float]:
    return {k: round(v, digits) for k, v in sorted(values.items())}


def _borrow(values: dict[str, float], engine: str, family: str) -> float:
    key = f"{engine}/{family}"
    if key in values:
        return values[key]
    same_family = [v for k, v in values.items() if k.endswith(f"/{family}")]
    if same_family:
        return statistics.median(same_family)
    same_engine = [v for k, v in values.items() if k.startswith(f"{engine}/")]
    return statistics.median(same_engine or list(values.values()))


@cache
def load_calibration() -> Calibration:
    """The calibration shipped with the package (data/calibration.json)."""
    text = resources.files("mgpu.planner").joinpath("data/calibration.json").read_text()
    return Calibration.from_json(json.loads(text))


def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Non-negative least squares, min ||a x - b|| subject to x >= 0 (Lawson and Hanson).

    Args:
        a: (rows, columns) design matrix.
        b: (rows,) target.
        tol: optimality tolerance.
    """
    columns = a.shape[1]
    passive = np.zeros(columns, dtype=bool)
    x = np.zeros(columns)
    gradient = a.T @ (b - a @ x)
    for _ in range(3 * columns + 10):
        if passive.all() or gradient[~passive].max() <= tol:
            break
        candidate = np.where(~passive, gradient, -np.inf)
        passive[int(np.argmax(candidate))] = True
        while True:
            trial = np.zeros(columns)
            trial[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (trial[passive] > 0).all():
                break
            # Step back towards x until the first coordinate hits zero, and drop it.
            blocking = passive & (trial <= 0)
            alpha = np.min(x[blocking] / (x[blocking] - trial[blocking]))
            x = x + alpha * (trial - x)
            passive &= x > tol
        x = trial
        gradient = a.T @ (b - a @ x)
    return x


def _hbm_engines(cases: list[Case]) -> list[str]:
    """Engines with enough rows on both memory kinds to calibrate their HBM penalty."""
    counts: dict[tuple[str, bool], int] = {}
    for case in cases:
        key = (case.engine.name, case.is_hbm)
        counts[key] = counts.get(key, 0) + 1
    engines = {case.engine.name for case in cases}
    return sorted(
        e
        for e in engines
        if min(counts.get((e, False), 0), counts.get((e, True), 0)) >= MIN_ROWS_PER_MEMORY_KIND
    )


def _design(
    cases: list[Case], overhead_keys: list[str], groups: list[str], hbm: list[str]
) -> np.ndarray:
    """Columns: a'[group] (a = 1 + a'), d[HBM engine], c[overhead key], s, h, r; rows scaled to
    relative error."""
    rows = []
    for case in cases:
        t = 1.0 / case.measurement.decode_tok_s
        key = case.engine.name if case.engine.name in overhead_keys else POOLED
        cost = case.decode
        row = [cost.memory_s if case.group == g else 0.0 for g in groups]
        row += [cost.hbm_memory_s if case.engine.name == e else 0.0 for e in hbm]
        row += [float(cost.layers) if key == k else 0.0 for k in overhead_keys]
        row += [float(cost.allreduces), float(cost.stage_hops), float(cost.row_split_syncs)]
        rows.append(np.array(row) / t)
    return np.array(rows)


def fit(cases: list[Case], iterations: int = 40) -> Calibration:
    """Fit the speed constants to the cases (see the module docstring).

    Args:
        cases: measurements rebuilt as plans.
        iterations: re-weighting rounds towards least absolute relative error.
    """
    groups = sorted({c.group for c in cases})
    hbm = _hbm_engines(cases)
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.engine.name] = counts.get(case.engine.name, 0) + 1
    own = sorted(e for e, n in counts.items() if n >= MIN_ROWS_FOR_OWN_OVERHEAD)
    overhead_keys = [*own, POOLED]
    design = _design(cases, overhead_keys, groups, hbm)
    # Target: what the measured time leaves after the parts with no constant to fit (a = 1 share
    # of the memory time, link physics), relative to the measured time.
    target = np.array(
        [1.0 - (c.decode.memory_s + c.decode.link_s) * c.measurement.decode_tok_s for c in cases]
    )
    scale = np.linalg.norm(design, axis=0)
    scale[scale == 0] = 1.0
    weights = np.ones(len(cases))
    solution = np.zeros(design.shape[1])
    for _ in range(iterations):
        root = np.sqrt(weights)[:, None]
        solution = nnls(design * root / scale, target * root[:, 0]) / scale
        residual = design @ solution - target
        weights = 1.0 / np.maximum(np.abs(residual), 0.02)
    n_groups, n_hbm, n_over = len(groups), len(hbm), len(overhead_keys)
    efficiency = {g: 1.0 + float(solution[i]) for i, g in enumerate(groups)}
    penalty = {e: float(solution[n_groups + i]) for i, e in enumerate(hbm)}
    first = n_groups + n_hbm
    overhead = {k: float(solution[first + i]) for i, k in enumerate(overhead_keys)}
    allreduce, hop, row_split = (float(v) for v in solution[first + n_over :])
    partial = Calibration(efficiency, overhead, allreduce, hop, row_split, {}, penalty)
    mfu = _fit_mfu(cases, partial)
    return Calibration(efficiency, overhead, allreduce, hop, row_split, mfu, penalty)


def _fit_mfu(cases: list[Case], partial: Calibration) -> dict[str, float]:
    """Median prefill MFU per engine/format over rows with a prefill figure and a citable peak."""
    implied: dict[str, list[float]] = {}
    for case in cases:
        measured = case.measurement.prefill_tok_s
        if measured is None or case.prefill_peak_estimated:
            continue
        k = partial.constants(case.engine.name, case.fmt.family, mfu=math.inf)
        compute = sum(stage.compute_s for stage in case.prefill.stages)
        # A prefill chunk is compute-bound: the measured time minus every non-compute term (the
        # step time with infinite MFU, less its memory time) is what the FLOPs took.
        budget = case.engine.prefill_chunk_tokens / measured - step_seconds(case.prefill, k)
        budget += sum(
            (k.hbm_inverse_efficiency if s.is_hbm else k.inverse_efficiency) * s.memory_s
            for s in case.prefill.stages
        )
        if budget > 0:
            implied.setdefault(case.group, []).append(min(1.0, compute / budget))
    return {group: statistics.median(values) for group, values in implied.items()}


def predict_decode(case: Case, calibration: Calibration) -> float:
    """Predicted batch-1 decode tokens/s of a case.

    Args:
        case: the rebuilt measurement.
        calibration: the constants.
    """
    k = calibration.constants(case.engine.name, case.fmt.family)
    return 1.0 / step_seconds(case.decode, k)


def predict_prefill(case: Case, calibration: Calibration) -> float:
    """Predicted prefill tokens/s of a case (one chunk).

    Args:
        case: the rebuilt measurement.
        calibration: the constants.
    """
    k = calibration.constants(case.engine.name, case.fmt.family)
    return case.engine.prefill_chunk_tokens / step_seconds(case.prefill, k)


@dataclass(frozen=True)
class Validation:
    """Predicted against measured, in-sample and leave-one-out."""

    cases: list[Case]
    decode: list[float]
    decode_loo: list[float]
    prefill: list[float | None]
    prefill_loo: list[float | None]

    @staticmethod
    def _errors(cases: list[Case], predicted: list[float], prefill: bool = False) -> list[float]:
        errors = []
        for case, value in zip(cases, predicted, strict=True):
            measured = case.measurement.prefill_tok_s if prefill else case.measurement.decode_tok_s
            if value is not None and measured is not None:
                errors.append(abs(value - measured) / measured)
        return errors

    @property
    def median_error(self) -> float:
        """Median absolute relative decode error, in-sample."""
        return statistics.median(self._errors(self.cases, self.decode))

    @property
    def loo_median_error(self) -> float:
        """Median absolute relative decode error when each row is predicted by a fit without it."""
        return statistics.median(self._errors(self.cases, self.decode_loo))

    @property
    def prefill_median_error(self) -> float:
        """Median absolute relative prefill error over rows with a prefill figure, in-sample."""
        return statistics.median(self._errors(self.cases, self.prefill, prefill=True))

    @property
    def prefill_loo_median_error(self) -> float:
        """Leave-one-out median absolute relative prefill error."""
        return statistics.median(self._errors(self.cases, self.prefill_loo, prefill=True))

    def group_errors(self, loo: bool = True) -> dict[str, list[float]]:
        """Absolute relative decode errors per ``engine x hardware class`` group.

        Args:
            loo: the leave-one-out predictions (else the fit on every row).
        """
        predicted = self.decode_loo if loo else self.decode
        groups: dict[str, list[float]] = {}
        for case, value in zip(self.cases, predicted, strict=True):
            measured = case.measurement.decode_tok_s
            key = f"{case.engine.name} x {case.hardware_class}"
            groups.setdefault(key, []).append(abs(value - measured) / measured)
        return dict(sorted(groups.items()))

    @property
    def not_fitting(self) -> list[str]:
        """Ids of rows that ran in reality but that the planner says do not fit."""
        return [c.measurement.row_id for c in self.cases if not c.fits]


def validate(cases: list[Case], calibration: Calibration) -> Validation:
    """Predict every case with ``calibration``, and with a fit that leaves that case out.

    Args:
        cases: the measurements rebuilt as plans.
        calibration: the constants to validate (normally the fit on all cases).
    """
    decode = [predict_decode(c, calibration) for c in cases]
    prefill = [
        predict_prefill(c, calibration) if c.measurement.prefill_tok_s else None for c in cases
    ]
    decode_loo, prefill_loo = [], []
    for index, case in enumerate(cases):
        held_out = fit(cases[:index] + cases[index + 1 :])
        decode_loo.append(predict_decode(case, held_out))
        prefill_loo.append(
            predict_prefill(case, held_out) if case.measurement.prefill_tok_s else None
        )
    return Validation(cases, decode, decode_loo, prefill, prefill_loo)


def _ratio_range(
    cases: list[Case], predicted: list[float | None], prefill: bool
) -> tuple[float, float]:
    ratios = []
    for case, value in zip(cases, predicted, strict=True):
        measured = case.measurement.prefill_tok_s if prefill else case.measurement.decode_tok_s
        if value and measured:
            ratios.append(measured / value)
    quantiles = statistics.quantiles(ratios, n=10)
    return quantiles[0], quantiles[-1]


def calibrate(path: Path | None = None) -> tuple[Calibration, Validation]:
    """Fit on every usable measurement, validate, and attach the error report and ranges.

    The low-high range of a prediction is the 10th-90th percentile of measured/predicted over the
    leave-one-out predictions, so it reflects how far off an unseen configuration can be.

    Args:
        path: measured_speeds.csv; the package's copy when None.
    """
    cases = [build_case(m) for m in load_measurements(path)]
    calibration = fit(cases)
    validation = validate(cases, calibration)
    n_params = (
        len(calibration.inverse_efficiency)
        + len(calibration.hbm_penalty)
        + len(calibration.layer_overhead_s)
        + 3
    )
    report = {
        "rows": len(cases),
        "decode_parameters": n_params,
        "prefill_parameters": len(calibration.mfu),
        "decode_median_abs_rel_error": round(validation.median_error, 4),
        "decode_loo_median_abs_rel_error": round(validation.loo_median_error, 4),
        "prefill_rows": sum(1 for c in cases if c.measurement.prefill_tok_s),
        "prefill_median_abs_rel_error": round(validation.prefill_median_error, 4),
        "prefill_loo_median_abs_rel_error": round(validation.prefill_loo_median_error, 4),
        "rows_predicted_not_to_fit": validation.not_fitting,
    }
    final = Calibration(
        calibration.inverse_efficiency,
        calibration.layer_overhead_s,
        calibration.allreduce_overhead_s,
        calibration.stage_hop_s,
        calibration.row_split_sync_s,
        calibration.mfu,
        calibration.hbm_penalty,
        _ratio_range(cases, validation.decode_loo, prefill=False),
        _ratio_range(cases, validation.prefill_loo, prefill=True),
        report,
    )
    return final, validation


@dataclass(frozen=True)
class TensorParallelCheck:
    """A published TP=2 decode on an NVLink pair beside the model's prediction of it."""

    row_id: str
    label: str
    measured: float
    predicted: float
    predicted_efficiency: float
    single_row_id: str | None
    single_measured: float | None

    @property
    def measured_efficiency(self) -> float | None:
        """TP=2 speed over twice the same setup's one-GPU speed, where both were published."""
        if self.single_measured is None:
            return None
        return self.measured / (2 * self.single_measured)


def tensor_parallel_checks(
    validation: Validation, calibration: Calibration
) -> list[TensorParallelCheck]:
    """Every usable TP=2 NVLink row: measured against predicted speed and scaling efficiency.

    The predicted efficiency is the plan's: the TP=2 prediction over twice the prediction on one
    of the GPUs (the same formula as ``Plan.tp_scaling_efficiency``). The measured one needs a
    one-GPU row of the same engine, model, precision, GPU and source.

    Args:
        validation: the validated cases.
        calibration: the constants.
    """
    checks = []
    cases = validation.cases
    for case, loo in zip(cases, validation.decode_loo, strict=True):
        m = case.measurement
        if m.tp != 2 or m.pp != 1 or m.interconnect != "nvlink":
            continue
        single = next(
            (
                c.measurement
                for c in cases
                if c.measurement.gpu_count == 1
                and (c.measurement.engine, c.measurement.model, c.measurement.quantization)
                == (m.engine, m.model, m.quantization)
                and (c.measurement.gpu, c.measurement.source) == (m.gpu, m.source)
            ),
            None,
        )
        one = Layout(SINGLE, 1, 1, (case.model.config.num_hidden_layers,), case.layout.devices[:1])
        link = make_interconnect(None, list(one.devices))
        alone = step_cost(
            case.model.config,
            case.fmt.bits_per_weight,
            case.engine,
            one,
            link,
            1,
            VALIDATION_POSITION,
            2.0,
        )
        k = calibration.constants(case.engine.name, case.fmt.family)
        predicted_single = 1.0 / step_seconds(alone, k)
        predicted = predict_decode(case, calibration)
        checks.append(
            TensorParallelCheck(
                row_id=m.row_id,
                label=f"{m.model} {m.quantization} {m.engine}, 2x {m.gpu}",
                measured=m.decode_tok_s,
                predicted=loo,
                predicted_efficiency=predicted / (2 * predicted_single),
                single_row_id=single.row_id if single else None,
                single_measured=single.decode_tok_s if single else None,
            )
        )
    return checks
