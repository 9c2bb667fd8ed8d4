"""``mgpu bench`` pieces that need no server: lengths, arrivals, percentiles, sweeps, reports."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from mgpu.bench.client import RequestResult, request_body
from mgpu.bench.local import layout_label, parse_sweeps, verdict
from mgpu.bench.report import (
    compare_table,
    load_document,
    percentile,
    run_document,
    summarize_level,
    to_csv,
)
from mgpu.bench.runner import LevelRun, poisson_delays
from mgpu.bench.workload import BenchRequest, file_requests, parse_lengths, synthetic_requests
from mgpu.errors import ConfigError


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    values = list(rng.exponential(size=37))
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_lengths_fixed_uniform_and_refused() -> None:
    assert parse_lengths("64") == (64, 64)
    assert parse_lengths("16-32") == parse_lengths("16:32") == (16, 32)
    for bad in ("0", "9-3", "a", "1-2-3"):
        with pytest.raises(ConfigError):
            parse_lengths(bad)
    reqs = synthetic_requests(200, "5-9", "3", seed=1)
    assert {r.max_tokens for r in reqs} == {3}
    assert {r.prompt_words for r in reqs} == set(range(5, 10))
    assert all(len(r.prompt.split()) == r.prompt_words for r in reqs)
    assert reqs == synthetic_requests(200, "5-9", "3", seed=1)  # reproducible
    shared = synthetic_requests(3, "4", "2", shared_prefix_words=20)
    assert len({" ".join(r.prompt.split()[:20]) for r in shared}) == 1


def test_requests_from_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "reqs.jsonl"
    path.write_text('{"prompt": "a b", "max_tokens": 5}\n\n{"prompt": "c"}\n')
    reqs = file_requests(path, 5, "7")
    assert [(r.prompt, r.max_tokens) for r in reqs[:2]] == [("a b", 5), ("c", 7)]
    assert len(reqs) == 5 and reqs[2] == reqs[0]  # cycled
    with pytest.raises(ConfigError, match="max_tokens"):
        file_requests(path, None, None)


def test_poisson_arrivals_have_the_rate() -> None:
    starts = poisson_delays(4000, rate=5.0, seed=3)
    gaps = np.diff(starts)
    assert starts[0] == 0.0 and (gaps >= 0).all()
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.08)
    assert poisson_delays(3, float("inf")) == [0.0, 0.0, 0.0]


def test_sweep_points_and_labels() -> None:
    points = parse_sweeps(["tp=1,2", "max_num_seqs=8,16"])
    assert points[1] == [("--tensor-parallel-size", "1"), ("--max-num-seqs", "16")]
    assert len(points) == 4
    assert layout_label(points[3]) == "tp=2,max-num-seqs=16"
    assert parse_sweeps([]) == [[]]
    with pytest.raises(ConfigError):
        parse_sweeps(["tp"])


def _result(ttft: float, gaps: list[float], tokens: int, ok: bool = True) -> RequestResult:
    times = [ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestResult(
        ok=ok,
        error=None if ok else "HTTP 500",
        ttft=ttft if ok else None,
        latency=times[-1],
        chunk_times=times if ok else [],
        output_tokens=tokens if ok else 0,
        prompt_tokens=10 if ok else 0,
    )


def test_level_summary_csv_compare_and_verdict(tmp_path: Path) -> None:
    results = [_result(0.1, [0.02, 0.03], 3), _result(0.3, [0.01], 2), _result(0, [], 0, False)]
    level = summarize_level(LevelRun(2, None, 2.0, results))
    assert (level["completed"], level["errors"]) == (2, 1)
    assert level["error_kinds"] == {"HTTP 500": 1}
    assert level["total_output_tokens"] == 5 and level["output_tokens_per_s"] == 2.5
    assert level["requests_per_s"] == 1.0 and level["total_prompt_tokens"] == 20
    assert level["ttft_s"]["mean"] == pytest.approx(0.2)
    assert level["itl_s"]["p50"] == pytest.approx(0.02)
    assert level["tpot_s"]["mean"] == pytest.approx((0.025 + 0.01) / 2)
    assert level["e2e_s"]["p99"] == pytest.approx(np.percentile([0.15, 0.31], 99))
    doc = run_document({"label": "a"}, [level])
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    assert load_document(path) == json.loads(json.dumps(doc))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError):
        load_document(tmp_path / "bad.json")
    rows = to_csv(doc).splitlines()
    assert rows[0].startswith("label,concurrency,request_rate") and len(rows) == 2
    faster = json.loads(json.dumps(doc))
    faster["levels"][0]["output_tokens_per_s"] = 5.0
    faster["levels"][0]["itl_s"]["p50"] = 0.01
    assert "(2.00x)" in compare_table([("a", doc), ("b", faster)])
    assert verdict([("tp=1", doc), ("tp=2", faster)]).startswith(
        "tp=2 against tp=1: yes, for throughput and single-stream speed"
    )
    assert ": no." in verdict([("tp=1", faster), ("tp=2", doc)])


def test_extra_body_fields_are_merged() -> None:
    """A server without ``ignore_eos`` (llama.cpp) gets its EOS tokens banned instead."""
    req = BenchRequest("hello", 8)
    body = request_body(req, "m", "completions", {"logit_bias": {"1": -100}})
    assert body["logit_bias"] == {"1": -100} and body["prompt"] == "hello"
    assert body["max_tokens"] == 8 and body["ignore_eos"] is True
    assert "logit_bias" not in request_body(req, "m", "chat")
