"""Slide inference: the ``mirror`` slide encoder + CLS attention over one large slide.

What is timed: ``model.encode_slide(x)`` for ``x`` = N x D_p random patch features
(N = 20,000, D_p = 1024), in ``torch.inference_mode`` with the model in eval mode; the
median of repeats after one warm-up. One subprocess per precision, so the peak-memory row
(peak RSS on CPU, CUDA max allocated on CUDA) is that precision's own.

"No N x N matrix ever built" is checked, not assumed: one pass runs under a
TorchDispatchMode that sees every op's output shape and flags any with two dimensions
>= N or >= N^2 elements.

FLOPs are counted by FlopCounterMode over one pass. On a CPU without native bf16 the bf16
case is estimated from those FLOPs and the measured bf16 matmul rate when running it would
take longer than the case budget (the row then says ``[skipped]`` and gives the estimate).
"""

from __future__ import annotations

from typing import Any

from _harness import (
    GB,
    Case,
    Context,
    Row,
    ShapeWatch,
    autocast_ctx,
    bf16_native_on_cpu,
    count_flops,
    current_rss_bytes,
    measure_matmul_rate,
    reset_cuda_peak,
    time_against_matmul,
    top_ops_profile,
    torch_device,
)

TARGET_S = {"fp32": 3.0, "bf16": 1.5}
TARGET_MEM_GB = 2.0


def sizes(ctx: Context) -> dict[str, int]:
    if ctx.tiny:
        return {"n_tiles": 600, "patch_dim": 64, "embed_dim": 96}
    return {"n_tiles": 20_000, "patch_dim": 1024, "embed_dim": 768}


def cases(ctx: Context) -> list[Case]:
    out = []
    for prec in ("fp32", "bf16"):
        expected = [
            Row(f"slide_inference_{prec}", None, "s", TARGET_S[prec], "<=", extra={"precision": prec}),
            Row(f"slide_inference_peak_mem_{prec}", None, "GB", TARGET_MEM_GB, "<=",
                extra={"precision": prec}),
        ]
        if prec == "fp32":
            expected.append(Row("slide_inference_nxn_tensors", None, "tensors", 0, "<=",
                                extra={"precision": prec}))
        out.append(Case(f"slide_inference_{prec}", "bench_slide_inference:run",
                        {"precision": prec}, timeout_s=900 if ctx.scale == "full" else 300,
                        expected_rows=expected))
    return out


def _build(ctx: Context, device):
    import torch

    from mirror_model.models import create_model

    sz = sizes(ctx)
    torch.manual_seed(0)
    model = create_model("mirror", patch_dim=sz["patch_dim"], embed_dim=sz["embed_dim"])
    model = model.to(device).eval()
    x = torch.randn(sz["n_tiles"], sz["patch_dim"], device=device)
    return model, x, sz


def run(ctx: Context, precision: str) -> list[Row]:
    import torch

    device = torch_device(ctx.device)
    model, x, sz = _build(ctx, device)
    n = sz["n_tiles"]
    base_rss_gb = current_rss_bytes() / GB
    reset_cuda_peak(device)

    def infer():
        with torch.inference_mode(), autocast_ctx(device, precision):
            enc = model.encode_slide(x)
        return enc

    common: dict[str, Any] = {"precision": precision, "device": device.type, **sz}
    rows: list[Row] = []
    tgt = None if ctx.tiny else TARGET_S[precision]
    mem_tgt = None if ctx.tiny else TARGET_MEM_GB
    cmp_ = None if ctx.tiny else "<="

    slow_bf16 = precision == "bf16" and device.type == "cpu" and not bf16_native_on_cpu()
    if slow_bf16:
        # Count FLOPs in fp32 (same count; bf16 here runs at ~1 GFLOP/s) and decide.
        def infer32():
            with torch.inference_mode():
                return model.encode_slide(x)

        flops, _ = count_flops(infer32)
        rate = measure_matmul_rate(device, "bf16", budget_s=1.0)
        est_s = flops / (rate.gflops * 1e9)
        if est_s > ctx.case_budget_s:
            note = (f"not run: this CPU has no native bf16 (matmul {rate.gflops:.2f} GFLOP/s); "
                    f"estimated {est_s:,.0f} s from {flops / 1e9:.0f} GFLOP")
            rows.append(Row(f"slide_inference_{precision}", None, "s", tgt, cmp_,
                            met=None if ctx.tiny else False, status="skipped", note=note,
                            extra={**common, "estimated_s": est_s, "flops": flops,
                                   "matmul_gflops_adjacent": rate.gflops}))
            # Not measured: no target to miss (the time row carries the miss).
            rows.append(Row(f"slide_inference_peak_mem_{precision}", None, "GB",
                            status="skipped", note="bf16 case not run (see above)",
                            extra=dict(common)))
            return rows

    # One pass under the FLOP counter and the shape watch (doubles as warm-up).
    watch = ShapeWatch(n)
    with watch:
        flops, enc = count_flops(infer)
    attn = enc.attention
    attn_ok = (
        attn is not None
        and tuple(attn.shape[-1:]) == (n,)
        and bool(torch.isfinite(attn.float()).all())
        and abs(float(attn.float().sum()) - 1.0) < 1e-2
    )
    del enc

    repeats = {"full": 5, "quick": 2, "tiny": 1}[ctx.scale]
    # The counting pass above was the warm-up; full runs add one plain pass (caches, allocator).
    tp = time_against_matmul(infer, device, precision, flops, repeats=repeats,
                             warmup=1 if ctx.scale == "full" else 0, budget_s=ctx.case_budget_s,
                             rate_budget_s=1.0 if not ctx.tiny else 0.2)
    timing, mem_gb, mem_kind = tp.timing, tp.peak_gb, tp.memory_kind

    time_row = Row(
        f"slide_inference_{precision}", timing.median_s, "s", tgt, cmp_,
        note=f"encode_slide N={n:,} D_p={sz['patch_dim']} D={sz['embed_dim']}"
        + ("" if attn_ok else "; WARNING: attention not a distribution over N tiles"),
        extra={**common, **tp.extra(), "attention_ok": attn_ok},
    )
    rows.append(time_row)
    rows.append(Row(
        f"slide_inference_peak_mem_{precision}", mem_gb, "GB", mem_tgt, cmp_,
        note=f"{mem_kind}; process baseline before inference {base_rss_gb:.2f} GB",
        extra={**common, "memory_kind": mem_kind, "baseline_rss_gb": base_rss_gb},
    ))
    if precision == "fp32":
        bad = watch.violations()
        rows.append(Row(
            "slide_inference_nxn_tensors", len(bad), "tensors", None if ctx.tiny else 0, cmp_,
            note=(f"largest intermediate {list(watch.largest_shape)} from {watch.largest_op}"
                  + (f"; N x N from {bad[0][0]} {list(bad[0][1])}" if bad else "")),
            extra={**common, "largest_shape": list(watch.largest_shape),
                   "largest_op": watch.largest_op, "largest_numel": watch.largest_numel,
                   "violations": [[op, list(s)] for op, s in bad[:10]]},
        ))
    # Profile where the time goes when the target is missed (tells the owner which op).
    if tgt is not None and timing.median_s > tgt:
        top = top_ops_profile(infer)
        time_row.extra["top_ops"] = top
        time_row.note += "; top op " + ", ".join(
            f"{t['op']} {100 * t['share']:.0f}%" for t in top[:2])
    return rows
