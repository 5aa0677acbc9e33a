"""Smoke tests of the benchmark suite's machinery (benchmarks/): row schema, target logic,
FLOP counting, the N x N detector, the table, and one tiny end-to-end `run.py` call.

No timing is asserted anywhere: timings belong to the benchmark runs themselves.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness as H  # noqa: E402


# ----------------------------------------------------------------------------- target logic
def test_finish_row_at_most_met_and_missed() -> None:
    ok = H.finish_row(H.Row("a", 2.0, "s", 3.0, "<="))
    assert ok.met is True and "shortfall" not in ok.extra
    bad = H.finish_row(H.Row("b", 4.5, "s", 3.0, "<="))
    assert bad.met is False
    assert bad.extra["shortfall"] == pytest.approx(0.5)  # 50 % over the limit
    assert "1.5 s over the target" in bad.extra["shortfall_text"]


def test_finish_row_at_least_and_edge() -> None:
    bad = H.finish_row(H.Row("c", 240.0, "tiles/s", 300.0, ">="))
    assert bad.met is False
    assert bad.extra["shortfall"] == pytest.approx(0.2)  # 20 % below the floor
    edge = H.finish_row(H.Row("d", 300.0, "tiles/s", 300.0, ">="))
    assert edge.met is True


def test_finish_row_without_target_or_value() -> None:
    assert H.finish_row(H.Row("e", 1.0, "GB")).met is None
    missing = H.finish_row(H.Row("f", None, "s", 1.0, "<=", status="timeout"))
    assert missing.met is False
    d = missing.to_dict()
    for k in H.REQUIRED_KEYS:
        assert k in d


def test_row_extra_fields_do_not_override_schema() -> None:
    d = H.Row("g", 1.0, "s", extra={"name": "hijack", "gflops": 2.0}).to_dict()
    assert d["name"] == "g" and d["gflops"] == 2.0


# ----------------------------------------------------------------------------- FLOPs, shapes
def test_count_flops_matches_closed_form() -> None:
    import torch

    a, b = torch.randn(12, 20), torch.randn(20, 7)
    flops, out = H.count_flops(lambda: a @ b)
    assert flops == 2 * 12 * 20 * 7
    assert out.shape == (12, 7)


@pytest.mark.parametrize(
    ("shape", "channels_out", "kernel", "groups", "padding"),
    [
        ((8, 768, 16, 16), 768, 7, 768, 3),  # PPEG's depthwise 7x7 (the case torch gets wrong)
        ((2, 8, 300, 96), 8, (33, 1), 8, (16, 0)),  # the Nystrom value convolution, per head
        ((2, 12, 10, 10), 6, 3, 3, 0),  # 3 groups of 4 -> 2 channels, no padding
        ((2, 5, 9, 9), 7, 3, 1, 1),  # dense
    ],
)
def test_convolution_flops_match_hand_count(shape, channels_out, kernel, groups, padding) -> None:
    """Forward and backward FLOPs of a (grouped) convolution against a hand count:
    2 x (batch x output channels x input channels per group x output positions x taps) for
    the forward, and the same again for each of the input and the weight gradients."""
    import torch

    conv = torch.nn.Conv2d(shape[1], channels_out, kernel, padding=padding, groups=groups,
                           bias=False)  # fmt: skip
    x = torch.randn(*shape, requires_grad=True)
    out = conv(x)
    kh, kw = conv.kernel_size
    hand = 2 * shape[0] * channels_out * (shape[1] // groups) * out.shape[2] * out.shape[3] * kh * kw
    fwd, out = H.count_flops(lambda: conv(x))
    assert fwd == hand
    grad = torch.randn_like(out)
    bwd, _ = H.count_flops(lambda: out.backward(grad))
    assert bwd == 2 * hand  # grad wrt input and grad wrt weight
    if shape == (8, 768, 16, 16):
        assert hand == 154_140_672  # 0.154 GFLOP forward; torch's own counter says 118.5 G back


def test_shape_watch_flags_n_by_n_only() -> None:
    import torch

    n = 300
    q, k_land = torch.randn(n, 16), torch.randn(32, 16)
    with H.ShapeWatch(n) as w:
        _ = q @ k_land.T  # N x m: fine
    assert w.violations() == []
    assert w.largest_shape == (n, 32)
    with H.ShapeWatch(n) as w2:
        _ = q @ q.T  # N x N: flagged
    assert len(w2.violations()) == 1
    assert w2.violations()[0][1] == (n, n)


def test_matmul_rate_is_positive_and_bounded() -> None:
    import torch

    rate = H.measure_matmul_rate(torch.device("cpu"), "fp32", budget_s=0.2, max_n=256)
    assert rate.n == 256 and rate.gflops > 0 and math.isfinite(rate.gflops)


def test_format_table_lists_rows_and_misses() -> None:
    rows = [
        H.finish_row(H.Row("x_time", 4.0, "s", 3.0, "<=", extra={"precision": "fp32"})).to_dict(),
        H.finish_row(H.Row("y_rate", 10.0, "GFLOP/s")).to_dict(),
    ]
    text = H.format_table(rows)
    assert "x_time" in text and "y_rate" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("x_time"))
    assert " NO " in line and "over the target" in line


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow  # runs benchmarks/run.py --tiny in a subprocess (every benchmark once)
def test_run_py_tiny_writes_schema(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--scale",
            "tiny",
            "--out",
            str(out),
            "--only",
            "slide_inference_fp32",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    for name in (
        "matmul_fp32",
        "matmul_bf16",
        "slide_inference_fp32",
        "slide_inference_peak_mem_fp32",
        "slide_inference_nxn_tensors",
    ):
        assert name in by_name, (name, sorted(by_name), proc.stderr[-2000:])
    for r in rows:
        for k in H.REQUIRED_KEYS:
            assert k in r, (r["name"], k)
        assert r["status"] == "ok", (r["name"], r["note"])
        # Tiny sizes evaluate no targets; every figure carries the run's matmul rates.
        assert r["target"] is None and r["met"] is None
        assert r["matmul_gflops_fp32"] == by_name["matmul_fp32"]["value"]
    si = by_name["slide_inference_fp32"]
    assert si["value"] > 0 and si["flops"] > 0 and si["attention_ok"] is True
    assert si["fraction_of_matmul"] > 0
    assert by_name["slide_inference_nxn_tensors"]["value"] == 0
    assert by_name["slide_inference_peak_mem_fp32"]["value"] > 0
    # The printed table names every row.
    for name in by_name:
        assert name in proc.stdout


def test_run_py_list_names_every_benchmark() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--list"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    for name in (
        "matmul_fp32",
        "slide_inference_bf16",
        "pretrain_authors_fp32",
        "pretrain_small_bf16",
        "extract_stain_texture",
        "extract_vit_s",
        "plugin_run_to_heatmap",
        "plugin_widget_run_to_heatmap",
        "plugin_show_result_block",
    ):
        assert name in proc.stdout


def test_pretrain_step_tiny_in_process(tmp_path: Path) -> None:
    import bench_pretrain

    ctx = H.Context(scale="tiny", cache_dir=str(tmp_path))
    rows = [H.finish_row(r).to_dict() for r in bench_pretrain.run(ctx, "authors", "fp32")]
    names = [r["name"] for r in rows]
    assert names == [
        "pretrain_authors_fp32_step",
        "pretrain_authors_fp32_flops_fraction",
        "pretrain_authors_fp32_peak_mem",
    ]
    step = rows[0]
    assert step["finite_loss"] is True and step["flops"] > 0
    assert set(step["loss_terms"]) >= {"align", "loss"}
    # Fraction row = achieved GFLOP/s over the adjacent matmul rate, in percent.
    assert rows[1]["value"] == pytest.approx(100 * step["gflops"] / step["matmul_gflops_adjacent"])


def test_count_flops_includes_cpu_attention() -> None:
    import torch
    import torch.nn.functional as F

    q, k, v = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    flops, _ = H.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 4 * 1 * 2 * 50 * 30 * 8  # QKᵀ and PV, 2 FLOPs per multiply-add
