"""The speed model against measured_speeds.csv, and the generated documents kept true.

The calibration is refitted here (a few seconds, leave-one-out included), so a change to the model,
the catalogue or the data that breaks the validation, the shipped constants, the table in
docs/planner.md or the examples in docs/guide.md fails this file.
"""

from __future__ import annotations

import csv
import importlib.util
import json
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
