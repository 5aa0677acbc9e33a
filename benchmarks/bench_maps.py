"""Per-tile maps: the subtype and risk maps for one large slide, as a multiple of plain
inference.

What is timed, interleaved in one process (A, B, A, B, ...): A = ``model.encode_slide(x)`` in
``torch.inference_mode`` (what a plain ``predict`` spends on the slide encoder), B =
:func:`mirror_model.maps.head_maps` for 3 subtype classes and the risk head (what
``predict(..., maps=True)`` adds: one forward with gradients and one backward per independent
read-out), for x = N x D_p random patch features (N = 20,000, D_p = 1024, ``mirror`` preset,
D = 768, as ``slide_inference``). The row is median(B) / median(A); the absolute times are
reported beside it.
"""

from __future__ import annotations

from typing import Any

from _harness import Case, Context, Row, autocast_ctx, bf16_native_on_cpu, time_fn, torch_device

TARGET_RATIO = 3.0


def cases(ctx: Context) -> list[Case]:
    return [
        Case("maps_fp32", "bench_maps:run", {"precision": "fp32"},
             timeout_s=900 if ctx.scale == "full" else 300,
             expected_rows=[Row("maps_over_inference_fp32", None, "x", TARGET_RATIO, "<=")]),
    ]


def run(ctx: Context, precision: str) -> list[Row]:
    import numpy as np
    import torch
    from bench_slide_inference import _build

    from mirror_model.maps import SlideHeads, head_maps

    device = torch_device(ctx.device)
    if precision == "bf16" and device.type == "cpu" and not bf16_native_on_cpu():
        return [Row(f"maps_over_inference_{precision}", None, "x", status="skipped",
                    note="no native bf16 on this CPU")]
    model, x, sz = _build(ctx, device)
    d = sz["embed_dim"]
    rng = np.random.default_rng(0)
    heads = SlideHeads("slide", ("a", "b", "c"), rng.normal(size=(3, d)), np.zeros(3),
                       rng.normal(size=d), 0.0)

    def plain() -> Any:
        with torch.inference_mode(), autocast_ctx(device, precision):
            return model.encode_slide(x).embedding

    def maps() -> Any:
        return head_maps(model, x, heads, precision=precision)

    repeats = {"full": 3, "quick": 1, "tiny": 1}[ctx.scale]
    plain()  # warm-up
    maps()
    a_times: list[float] = []
    b_times: list[float] = []
    util = []
    for _ in range(repeats):
        ta = time_fn(plain, device, repeats=1, warmup=0)
        tb = time_fn(maps, device, repeats=1, warmup=0)
        a_times += ta.times_s
        b_times += tb.times_s
        util += [ta.cpu_utilization(), tb.cpu_utilization()]
    a, b = float(np.median(a_times)), float(np.median(b_times))
    u = [v for v in util if v is not None]
    return [Row(
        f"maps_over_inference_{precision}", b / a, "x", None if ctx.tiny else TARGET_RATIO,
        None if ctx.tiny else "<=",
        note=f"maps {b:.2f} s vs encode_slide {a:.2f} s, N={sz['n_tiles']:,} D_p={sz['patch_dim']} "
             f"D={d}, 3 classes + risk",
        extra={"precision": precision, "device": device.type, **sz, "maps_s": b_times,
               "inference_s": a_times, "cpu_utilization": float(np.mean(u)) if u else None},
    )]
