"""The speed model against measured_speeds.csv, and the generated documents kept true.

The calibration is refitted here (a few seconds, leave-one-out included), so a change to the model,
the catalogue or the data that breaks the validation, the shipped constants, the table in
docs/planner.md or the examples in docs/guide.md fails this file.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import statistics
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from mgpu.planner.calibration import (
    Calibration,
    Validation,
    calibrate,
    load_calibration,
    measurements_path,
    nnls,
    tensor_parallel_checks,
)

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def calibrated() -> tuple[Calibration, Validation]:
    return calibrate()


def test_decode_median_error_within_25_percent(calibrated: tuple[Calibration, Validation]) -> None:
    _, validation = calibrated
    assert validation.median_error <= 0.25
    # Honest about the fit: each row predicted by constants fitted without it.
    assert validation.loo_median_error <= 0.25


def _shared_or_packaged() -> Path:
    shared = SHARED_DATA / "measured_speeds.csv"
    return shared if shared.is_file() else measurements_path()


@pytest.fixture(scope="module")
def shared_validation(calibrated: tuple[Calibration, Validation]) -> Validation:
    """The validation on ../shared/data/measured_speeds.csv (the package's copy when absent)."""
    path = _shared_or_packaged()
    if path.read_bytes() == measurements_path().read_bytes():
        return calibrated[1]
    return calibrate(path)[1]


def test_leave_one_out_decode_error_within_7_percent(shared_validation: Validation) -> None:
    errors = [
        abs(loo - c.measurement.decode_tok_s) / c.measurement.decode_tok_s
        for c, loo in zip(shared_validation.cases, shared_validation.decode_loo, strict=True)
    ]
    assert statistics.median(errors) == pytest.approx(shared_validation.loo_median_error)
    assert statistics.median(errors) <= 0.07


#: Groups above 20% leave-one-out, each explained in docs/planner.md: ExLlama's two rows (7B on a
#: 3090 Ti, 13B on a 4090, one source) differ 2.2x in speed per byte, which no constant per engine
#: can predict one from the other. Listed so that fixing or breaking any group shows here.
KNOWN_GROUPS_OVER_20 = {"exllama x consumer"}


def test_engine_by_hardware_class_groups_within_20_percent(shared_validation: Validation) -> None:
    medians = {
        group: statistics.median(errors)
        for group, errors in shared_validation.group_errors(loo=True).items()
    }
    over = {group for group, value in medians.items() if value > 0.20}
    assert over == KNOWN_GROUPS_OVER_20, medians


def test_tensor_parallel_efficiency_against_the_nvlink_pair(
    calibrated: tuple[Calibration, Validation],
) -> None:
    calibration, validation = calibrated
    checks = {c.row_id: c for c in tensor_parallel_checks(validation, calibration)}
    paired = [c for c in checks.values() if c.measured_efficiency is not None]
    assert paired, "measured_speeds.csv has a TP=2 NVLink row with its one-GPU counterpart"
    for check in paired:
        assert check.measured_efficiency is not None
        assert abs(check.predicted_efficiency - check.measured_efficiency) <= 0.05
        # The data shows about 80%, not the 90-95% often quoted for NVLink pairs.
        assert check.measured_efficiency < 0.9
    for check in checks.values():
        assert abs(check.predicted / check.measured - 1) <= 0.10


def test_no_row_that_ran_is_predicted_not_to_fit(
    calibrated: tuple[Calibration, Validation],
) -> None:
    assert calibrated[1].not_fitting == []


def test_every_usable_row_is_validated(calibrated: tuple[Calibration, Validation]) -> None:
    rows = list(csv.DictReader(measurements_path().read_text().splitlines()))
    usable = [r["id"] for r in rows if r["usable_for_single_stream_validation"] == "yes"]
    assert [c.measurement.row_id for c in calibrated[1].cases] == usable
    assert len(usable) > 50


def test_fewer_constants_than_rows(calibrated: tuple[Calibration, Validation]) -> None:
    report = calibrated[0].report
    assert report["decode_parameters"] * 3 < report["rows"]


def test_shipped_calibration_is_the_fit(calibrated: tuple[Calibration, Validation]) -> None:
    script = _script("validate_planner")
    stored = json.loads(json.dumps(load_calibration().to_json()))
    assert script._same_calibration(stored, calibrated[0].to_json()), (
        "run python scripts/validate_planner.py --fit"
    )


def test_validation_table_in_docs_is_up_to_date(
    calibrated: tuple[Calibration, Validation],
) -> None:
    script = _script("validate_planner")
    text = (ROOT / "docs" / "planner.md").read_text()
    expected = script.replace_section(text, script.validation_markdown(*calibrated))
    assert text == expected, "run python scripts/validate_planner.py"


def test_guide_is_up_to_date() -> None:
    script = _script("gen_guide")
    text = (ROOT / "docs" / "guide.md").read_text()
    if text.splitlines()[0] != script.stamp():
        # Another rich version draws the same tables differently; only the layout would differ.
        pytest.skip(f"guide drawn with another rich version: {text.splitlines()[0]}")
    assert text == script.render_guide(), "run python scripts/gen_guide.py"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no ../shared/data beside the repository")
@pytest.mark.parametrize("name", ["gpu_specs.csv", "measured_speeds.csv"])
def test_package_data_is_the_shared_data(name: str) -> None:
    package = measurements_path().parent / name
    assert package.read_bytes() == (SHARED_DATA / name).read_bytes(), (
        f"copy ../shared/data/{name} to src/mgpu/planner/data/"
    )


def test_validation_on_the_shared_csv_when_present(
    calibrated: tuple[Calibration, Validation],
) -> None:
    shared = SHARED_DATA / "measured_speeds.csv"
    if not shared.is_file():
        pytest.skip("no ../shared/data beside the repository")
    if shared.read_bytes() == measurements_path().read_bytes():
        return  # the same rows: the fixture already validated them
    _, validation = calibrate(shared)
    assert validation.median_error <= 0.25 and validation.not_fitting == []


def test_nnls_matches_an_exact_solution() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((20, 4))
    truth = np.array([0.5, 0.0, 2.0, 1.0])
    assert np.allclose(nnls(a, a @ truth), truth, atol=1e-8)
    # A negative unconstrained optimum is clamped to zero.
    b = a @ np.array([1.0, -3.0, 0.5, 0.0])
    assert (nnls(a, b) >= 0).all()
