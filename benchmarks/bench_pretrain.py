"""Pretraining step of the ``mirror`` preset: how fast a cohort trains.

One step is exactly what :func:`mirror_model.train.trainer.train_fold` does per batch:
``renormalize_prototypes()``; forward under autocast; loss terms read back (``.item()``);
``zero_grad``; ``backward``; the trainer's (fused) ``Adam.step`` (lr 2e-5). Inputs are random features
``[B, N, D_p]`` and expression ``[B, G]``; dropout is on (train mode).

Sizes
-----
``pretrain_authors``: the authors' size, batch 16, N = 2048 tiles, D = 768, G = 10,000
genes, D_p = 768 (Phikon). Target: achieved FLOP/s >= 50 % of the matmul rate measured in
the same run and precision (FLOPs of forward + backward counted by FlopCounterMode; the
optimizer's element-wise work is not counted, so the fraction is conservative).
``pretrain_small``: batch 8, N = 256, G = 300 (D = 768, D_p = 768). Target: < 1 s per step
in bf16 (fp32 reported without a target).

On a CPU without native bf16, a bf16 case whose estimated time (FLOPs / bf16 matmul rate)
exceeds the case budget is reported as ``[skipped]`` with the estimate; FLOPs for the
estimate are counted at batch 1 in fp32 and scaled linearly in the batch (every term of the
model is per-sample except the B x B alignment logits, < 0.01 % of the total).
"""

from __future__ import annotations

from typing import Any

from _harness import (
    Case,
    Context,
    Row,
    autocast_ctx,
    bf16_native_on_cpu,
    count_flops,
    measure_matmul_rate,
    peak_memory,
    reset_cuda_peak,
    time_fn,
    top_ops_profile,
    torch_device,
)

TARGET_FRACTION_PCT = 50.0
TARGET_SMALL_BF16_S = 1.0


def sizes(ctx: Context, which: str) -> dict[str, int]:
    if ctx.tiny:
        return {"batch": 2, "n_tiles": 64, "embed_dim": 96, "n_genes": 50, "patch_dim": 32}
    if which == "authors":
        # --quick measures the same per-sample shapes at batch 2: the FLOP/s fraction (the
        # target) does not depend on the batch, the step time and memory do (the row says so).
        batch = 2 if ctx.scale == "quick" else 16
        return {"batch": batch, "n_tiles": 2048, "embed_dim": 768, "n_genes": 10_000, "patch_dim": 768}
    return {"batch": 8, "n_tiles": 256, "embed_dim": 768, "n_genes": 300, "patch_dim": 768}


def cases(ctx: Context) -> list[Case]:
    out = []
    for which in ("small", "authors"):
        for prec in ("fp32", "bf16"):
            name = f"pretrain_{which}_{prec}"
            exp = [Row(f"{name}_step", None, "s",
                       TARGET_SMALL_BF16_S if (which == "small" and prec == "bf16") else None,
                       "<=" if (which == "small" and prec == "bf16") else None,
                       extra={"precision": prec})]
            if which == "authors":
                exp.append(Row(f"{name}_flops_fraction", None, "% of matmul", TARGET_FRACTION_PCT,
                               ">=", extra={"precision": prec}))
                exp.append(Row(f"{name}_peak_mem", None, "GB", extra={"precision": prec}))
            out.append(Case(name, "bench_pretrain:run", {"which": which, "precision": prec},
                            timeout_s=1200 if ctx.scale == "full" else 400, expected_rows=exp))
    return out


class _Step:
    """Model, optimizer and one training step of the trainer's loop."""

    def __init__(self, ctx: Context, sz: dict[str, int], device, precision: str,
                 overrides: dict[str, Any] | None = None) -> None:
        import torch

        from mirror_model.models import create_model
        from mirror_model.train.trainer import make_optimizer

        torch.manual_seed(0)
        self.device, self.precision = device, precision
        self.model = create_model("mirror", patch_dim=sz["patch_dim"], n_genes=sz["n_genes"],
                                  embed_dim=sz["embed_dim"], **(overrides or {})).to(device).train()
        self.opt = make_optimizer(self.model.parameters(), lr=2e-5)
        g = torch.Generator(device="cpu").manual_seed(1)
        self.x = torch.randn(sz["batch"], sz["n_tiles"], sz["patch_dim"], generator=g).to(device)
        self.r = torch.randn(sz["batch"], sz["n_genes"], generator=g).to(device)
        self.terms: dict[str, float] = {}

    def fwd_bwd(self) -> None:
        if hasattr(self.model, "renormalize_prototypes"):
            self.model.renormalize_prototypes()
        with autocast_ctx(self.device, self.precision):
            out = self.model(features=self.x, rna=self.r)
        loss = out.loss.float()
        self.terms = {k: float(v.detach().float()) for k, v in out.losses.items()}
        self.terms["loss"] = float(loss.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        self.fwd_bwd()
        self.opt.step()


def run(ctx: Context, which: str, precision: str) -> list[Row]:
    import torch

    device = torch_device(ctx.device)
    sz = sizes(ctx, which)
    name = f"pretrain_{which}_{precision}"
    common: dict[str, Any] = {"precision": precision, "device": device.type, **sz}
    has_step_target = which == "small" and precision == "bf16" and not ctx.tiny
    step_tgt = TARGET_SMALL_BF16_S if has_step_target else None
    step_cmp = "<=" if has_step_target else None
    frac_tgt = None if ctx.tiny else TARGET_FRACTION_PCT
    frac_cmp = None if ctx.tiny else ">="
    rows: list[Row] = []

    if precision == "bf16" and device.type == "cpu" and not bf16_native_on_cpu():
        small = dict(sz, batch=1)
        probe = _Step(ctx, small, device, "fp32")
        flops_small, _ = count_flops(probe.fwd_bwd)
        del probe
        flops = flops_small * sz["batch"] / small["batch"]
        rate = measure_matmul_rate(device, "bf16", budget_s=1.0)
        est_s = flops / (rate.gflops * 1e9)
        if est_s > ctx.case_budget_s:
            note = (f"not run: this CPU has no native bf16 (matmul {rate.gflops:.2f} GFLOP/s); "
                    f"estimated {est_s:,.0f} s per step from {flops / 1e9:.0f} GFLOP")
            ex = {**common, "estimated_s": est_s, "flops": flops, "matmul_gflops_adjacent": rate.gflops,
                  "flops_method": f"counted at batch {small['batch']} (fp32), scaled to {sz['batch']}"}
            rows.append(Row(f"{name}_step", None, "s", step_tgt, step_cmp,
                            met=False if has_step_target else None, status="skipped", note=note,
                            extra=ex))
            if which == "authors":
                # The step was not run, so its fraction of the bf16 matmul rate is unknown.
                rows.append(Row(f"{name}_flops_fraction", None, "% of matmul", frac_tgt, frac_cmp,
                                status="skipped", note="bf16 step not run (see the step row)",
                                extra=dict(common)))
                rows.append(Row(f"{name}_peak_mem", None, "GB", status="skipped",
                                extra=dict(common)))
            return rows

    st = _Step(ctx, sz, device, precision)
    reset_cuda_peak(device)
    # First step under the FLOP counter (also the warm-up: allocations, Adam state).
    flops, _ = count_flops(st.fwd_bwd)
    st.opt.step()
    finite = all(v == v and abs(v) != float("inf") for v in st.terms.values())

    rate_before = measure_matmul_rate(device, precision, budget_s=0.2 if ctx.tiny else 1.0)
    # The FLOP-counting step above is also the warm-up. A full-size step is ~5 TFLOP (tens of
    # seconds on 2 cores), so repeats are few; time_fn also stops at the case budget.
    repeats = {"full": 3, "quick": 1, "tiny": 1}[ctx.scale]
    warmup = 1 if ctx.scale == "full" and which == "small" else 0
    timing = time_fn(st.step, device, repeats=repeats, warmup=warmup, budget_s=ctx.case_budget_s)
    rate_after = measure_matmul_rate(device, precision, budget_s=0.2 if ctx.tiny else 1.0)
    adjacent = 0.5 * (rate_before.gflops + rate_after.gflops)
    mem_gb, mem_kind = peak_memory(device)
    gflops = flops / timing.median_s / 1e9
    frac = gflops / adjacent

    ex = {**common, **timing.extra(), "flops": flops, "gflops": gflops, "fraction_of_matmul": frac,
          "matmul_gflops_adjacent": adjacent, "loss_terms": st.terms, "finite_loss": finite}
    desc = (f"B={sz['batch']} N={sz['n_tiles']} D={sz['embed_dim']} G={sz['n_genes']} "
            f"D_p={sz['patch_dim']}; fwd+bwd+Adam")
    if which == "authors" and ctx.scale == "quick":
        desc += " (--quick: batch 2 of the authors' 16; time and memory scale ~linearly)"
    step_row = Row(f"{name}_step", timing.median_s, "s", step_tgt, step_cmp,
                   note=desc + ("" if finite else "; WARNING: non-finite loss"), extra=ex)
    rows.append(step_row)
    frac_row = None
    if which == "authors":
        frac_row = Row(f"{name}_flops_fraction", 100.0 * frac, "% of matmul", frac_tgt, frac_cmp,
                       note=f"{gflops:.1f} GFLOP/s achieved vs {adjacent:.1f} GFLOP/s matmul "
                            f"({flops / 1e9:.0f} GFLOP per step, FlopCounterMode)",
                       extra=dict(ex))
        rows.append(frac_row)
        rows.append(Row(f"{name}_peak_mem", mem_gb, "GB", note=mem_kind,
                        extra={**common, "memory_kind": mem_kind, "peak_gb": mem_gb}))
    missed = (step_tgt is not None and timing.median_s > step_tgt) or (
        frac_tgt is not None and which == "authors" and 100.0 * frac < frac_tgt)
    if missed and ctx.scale == "full":
        top = top_ops_profile(st.step)
        tgt_row = frac_row if frac_row is not None else step_row
        tgt_row.extra["top_ops"] = top
        tgt_row.note += "; top ops " + ", ".join(
            f"{t['op']} {100 * t['share']:.0f}%" for t in top[:3])
    del st
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
