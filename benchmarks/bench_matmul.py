"""The machine's own matmul rate (fp32 and bf16 GFLOP/s), the yardstick for every other row.

An ``n x n @ n x n`` product counts ``2 n^3`` FLOPs; the row reports the median of repeats.
``n`` grows until one product takes >= 50 ms (capped at 4096 on CPU, 8192 on CUDA).
"""

from __future__ import annotations

from _harness import Case, Context, Row, measure_matmul_rate, torch_device


def cases(ctx: Context) -> list[Case]:
    return [
        Case(
            name=f"matmul_{prec}",
            func="bench_matmul:run",
            kwargs={"precision": prec},
            timeout_s=180,
            expected_rows=[Row(f"matmul_{prec}", None, "GFLOP/s", extra={"precision": prec})],
        )
        for prec in ("fp32", "bf16")
    ]


def run(ctx: Context, precision: str) -> list[Row]:
    device = torch_device(ctx.device)
    budget = {"full": 4.0, "quick": 2.0, "tiny": 0.5}[ctx.scale]
    max_n = 512 if ctx.tiny else None
    rate = measure_matmul_rate(device, precision, budget_s=budget, max_n=max_n)
    return [
        Row(
            f"matmul_{precision}",
            rate.gflops,
            "GFLOP/s",
            note=f"{rate.n}x{rate.n} @ {rate.n}x{rate.n}, median of {len(rate.timing.times_s)}",
            extra={
                "precision": precision,
                "gflops": rate.gflops,
                "fraction_of_matmul": 1.0,
                "matrix_n": rate.n,
                "flops": 2 * rate.n**3,
                **rate.timing.extra(),
            },
        )
    ]
