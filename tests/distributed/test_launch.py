"""Workers are their own interpreters: the README example runs as a script, from stdin and -c."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


def _readme_example() -> str:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block is not None
    return block.group(1)


def test_readme_example_is_the_tested_one() -> None:
    code = _readme_example()
    assert "if __name__" not in code
    assert 'LLM(tensor_parallel_size=2, device="cpu"' in code  # runs as pasted: the demo model


@pytest.mark.parametrize("how", ["script", "stdin", "-c"])
def test_readme_example_runs_without_main_guard(tmp_path: Path, how: str) -> None:
    code = _readme_example()  # as a user pastes it, on the bundled demo model
    if how == "script":
        script = tmp_path / "example.py"
        script.write_text(code)
        cmd, stdin = [sys.executable, str(script)], None
    elif how == "stdin":
        cmd, stdin = [sys.executable, "-"], code
    else:
        cmd, stdin = [sys.executable, "-c", code], None
    done = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bootstrapping" not in done.stderr
    ids = re.search(r"\[([\d, ]+)\]\s*$", done.stdout)
    assert ids is not None, done.stdout
    assert len(ids.group(1).split(",")) == 32
