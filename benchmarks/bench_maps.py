"""Per-tile maps: the subtype and risk maps for one large slide, as a multiple of plain
inference.

What is timed, interleaved in one process (A, B, C, A, B, C, ...): A = ``model.encode_slide(x)``
in ``torch.inference_mode`` (what a plain ``predict`` spends on the slide encoder; the rest of
``predict`` — reading the features, the heads — only adds to A, so the ratio is an upper bound),
B = :func:`mirror_model.maps.head_maps` with the shipped method ``"tile-alone"`` (every tile
encoded as a one-tile slide, one batched forward for all maps), C = the candidate
``"gradient"`` (gradient × input: one forward with gradients and one backward per independent
read-out), both for 3 subtype classes and the risk head, for x = N x D_p random patch features
(N = 20,000, D_p = 1024, ``mirror`` preset, D = 768, as ``slide_inference``). The rows are
median(B) / median(A) and median(C) / median(A); the absolute times are reported beside them.
"""

from __future__ import annotations

from typing import Any

from _harness import Case, Context, Row, autocast_ctx, bf16_native_on_cpu, time_fn, torch_device

TARGET_RATIO = 3.0
METHODS = {"tile-alone": "maps_over_inference", "gradient": "maps_gradient_over_inference"}


def cases(ctx: Context) -> list[Case]:
    return [
        Case("maps_fp32", "bench_maps:run", {"precision": "fp32"},
             timeout_s=900 if ctx.scale == "full" else 300,
             expected_rows=[Row(f"{r}_fp32", None, "x", TARGET_RATIO, "<=")
                            for r in METHODS.values()]),
    ]


def run(ctx: Context, precision: str) -> list[Row]:
    import numpy as np
    import torch
    from bench_slide_inference import _build

    from mirror_model.maps import SlideHeads, head_maps

    device = torch_device(ctx.device)
    if precision == "bf16" and device.type == "cpu" and not bf16_native_on_cpu():
        return [Row(f"{r}_{precision}", None, "x", status="skipped",
                    note="no native bf16 on this CPU") for r in METHODS.values()]
    model, x, sz = _build(ctx, device)
    d = sz["embed_dim"]
    rng = np.random.default_rng(0)
    heads = SlideHeads("slide", ("a", "b", "c"), rng.normal(size=(3, d)), np.zeros(3),
                       rng.normal(size=d), 0.0)

    def plain() -> Any:
        with torch.inference_mode(), autocast_ctx(device, precision):
            return model.encode_slide(x).embedding

    fns = {m: (lambda m=m: head_maps(model, x, heads, method=m, precision=precision))
           for m in METHODS}
    repeats = {"full": 3, "quick": 1, "tiny": 1}[ctx.scale]
    plain()  # warm-up
    for f in fns.values():
        f()
    a_times: list[float] = []
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    util: dict[str, list[float]] = {m: [] for m in ("plain", *METHODS)}
    for _ in range(repeats):
        ta = time_fn(plain, device, repeats=1, warmup=0)
        a_times += ta.times_s
        util["plain"].append(ta.cpu_utilization())
        for m, f in fns.items():
            tb = time_fn(f, device, repeats=1, warmup=0)
            times[m] += tb.times_s
            util[m].append(tb.cpu_utilization())
    a = float(np.median(a_times))

    def mean_util(v: list[Any]) -> float | None:
        u = [x for x in v if x is not None]
        return float(np.mean(u)) if u else None

    rows = []
    for m, row in METHODS.items():
        b = float(np.median(times[m]))
        rows.append(Row(
            f"{row}_{precision}", b / a, "x", None if ctx.tiny else TARGET_RATIO,
            None if ctx.tiny else "<=",
            note=f"{m} maps {b:.2f} s vs encode_slide {a:.2f} s, N={sz['n_tiles']:,} "
                 f"D_p={sz['patch_dim']} D={d}, 3 classes + risk",
            extra={"precision": precision, "device": device.type, "method": m, **sz,
                   "maps_s": times[m], "inference_s": a_times,
                   "cpu_utilization_maps": mean_util(util[m]),
                   "cpu_utilization_inference": mean_util(util["plain"])},
        ))
    return rows
