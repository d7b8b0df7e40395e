"""The benchmarks' plumbing: tiny runs produce their JSON, and README's results are generated."""

from __future__ import annotations

import json

from bench import attention, moe, report


def test_readme_results_section_is_generated_from_the_json():
    assert report.main(["--check"]) == 0, "README.md is stale: run `python -m bench.report`"


def test_attention_bench_tiny_run_writes_json_and_plot(tmp_path):
    out = tmp_path / "attention.json"
    attention.main(["--lengths", "256", "512", "--repeats", "1", "--no-flex", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert [r["length"] for r in payload["results"]] == [256, 512]
    assert all(r["dense_peak_mb"] is not None and r["banded_fwd_bwd_s"] > 0 for r in payload["results"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_moe_bench_tiny_run_writes_json(tmp_path):
    out = tmp_path / "moe.json"
    moe.main(["--tokens", "256", "--d-model", "32", "--expert-hidden", "32", "--repeats", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert {r["variant"] for r in payload["results"]} == {"dense_ffn", "moe_sorted", "moe_looped", "all_experts"}
    assert set(payload["checks"]) == {"moe_speed_vs_dense_float32", "moe_speed_vs_dense_bfloat16"}
