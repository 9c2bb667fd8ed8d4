"""The shipped Prometheus rules and config: promtool checks them and runs their unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@needs_promtool
def test_rules_and_config_are_valid() -> None:
    assert "SUCCESS: 6 rules found" in _promtool("check", "rules", "alerts.yml")
    assert "is valid prometheus config" in _promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


def test_unit_tests_cover_every_alert_firing_and_not_firing() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules}
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
    fires, quiet = set(), set()
    for case in tests:
        # The subjects of a case: one series per instance or device (the others only pair up).
        subjects = [s for s in case["input_series"] if not s["series"].startswith(_SECONDARY)]
        for check in case["alert_rule_test"]:
            if check["exp_alerts"]:
                fires.add(check["alertname"])
            # Quiet: an evaluation expecting no alert, or fewer alerts than subjects.
            if len(check["exp_alerts"]) < len(subjects):
                quiet.add(check["alertname"])
    assert fires == alerts
    assert quiet == alerts


_SECONDARY = ("mgpu_device_memory_total_bytes", "mgpu_generation_tokens_total")
