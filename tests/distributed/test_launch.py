"""Workers are their own interpreters: the README example runs as a script, from stdin and -c."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mgpu.config import ModelConfig, ParallelConfig
from mgpu.engine.worker import (
    LONG_SPIN_MIN_PARAMS,
    SHARED_CORE_SPINCOUNT,
    SHARED_CORE_SPINCOUNT_LONG,
    shared_core_spincount,
)
from mgpu.memory import rank_weights
from mgpu.models.loader import demo_model_path


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


def _worker_env(llm: object) -> dict[str, str]:
    (proc,) = llm.engine.executor.procs  # type: ignore[attr-defined]
    raw = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_workers_on_the_engines_cores_wait_passively(monkeypatch: pytest.MonkeyPatch) -> None:
    """No core kept: the worker starts with OpenMP's passive waits; a policy the user set wins."""
    from mgpu import LLM

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with LLM(device="cpu", cpu_reserved_cores=0, max_model_len=128) as llm:
        env = _worker_env(llm)
        assert env.get("OMP_WAIT_POLICY") == "PASSIVE"
        assert env.get("GOMP_SPINCOUNT") == str(SHARED_CORE_SPINCOUNT)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with LLM(device="cpu", cpu_reserved_cores=0, max_model_len=128) as llm:
        assert _worker_env(llm).get("OMP_WAIT_POLICY") == "ACTIVE"


def test_spin_grows_with_the_parameters_a_rank_holds() -> None:
    """The demo model spins briefly; a ~140M Llama long, whether whole on one rank or split
    in two; split so far that a rank holds fewer than LONG_SPIN_MIN_PARAMS, briefly again."""
    demo = ModelConfig.from_file(demo_model_path())
    assert shared_core_spincount(demo, ParallelConfig()) == SHARED_CORE_SPINCOUNT
    big = ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 1024,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "tie_word_embeddings": True,
        }
    )
    per_rank = rank_weights(big, 1).matrix_elements
    assert per_rank // 2 >= LONG_SPIN_MIN_PARAMS > per_rank // 8
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        layout = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
        assert shared_core_spincount(big, layout) == SHARED_CORE_SPINCOUNT_LONG
    split = ParallelConfig(tensor_parallel_size=4, pipeline_parallel_size=2)
    assert shared_core_spincount(big, split) == SHARED_CORE_SPINCOUNT
