#!/usr/bin/env python
"""Run the napari-mirror performance suite and write a JSON list of result rows.

Usage::

    python benchmarks/run.py --out results.json            # full sizes (the issue's table)
    python benchmarks/run.py --out results.json --quick    # same sizes, fewer repeats (~2 min)
    python benchmarks/run.py --out results.json --device cuda   # CUDA + bf16 autocast
    python benchmarks/run.py --list                        # show the cases
    python benchmarks/run.py --out r.json --only slide_inference pretrain_small

Each case runs in a fresh subprocess so that its peak resident set size is its own.
The machine's matmul rate (fp32 and bf16 GFLOP/s) is measured first, in the same run,
and reported next to every figure. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
# Run from a source checkout without installation: make `src/` importable too.
_SRC = HERE.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(1, str(_SRC))

from _harness import (  # noqa: E402
    Case,
    Context,
    Row,
    finish_row,
    format_table,
    machine_info,
    write_json_atomic,
)

# Cheapest first: with --deadline-s, the expensive authors'-size training step comes last.
MODULES = [
    "bench_matmul",
    "bench_expression",
    "bench_heads",
    "bench_slide_inference",
    "bench_maps",
    "bench_extraction",
    "bench_plugin",
    "bench_pretrain",
]

# Per-scale budget for one case's timed work (s); the subprocess timeout is larger.
CASE_BUDGET_S = {"full": 120.0, "quick": 20.0, "tiny": 10.0}


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def _worker(func: str, ctx_json: str, kwargs_json: str, result_path: str) -> int:
    ctx = Context.from_json(ctx_json)
    kwargs = json.loads(kwargs_json)
    payload: dict[str, Any]
    try:
        import torch

        if ctx.threads:
            torch.set_num_threads(int(ctx.threads))
        module_name, fn_name = func.split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        rows = [finish_row(r).to_dict() for r in fn(ctx, **kwargs)]
        payload = {"rows": rows}
    except (ImportError, AttributeError) as exc:
        # A dependency (another part of napari-mirror) is missing or lacks the API used.
        payload = {"error": f"{type(exc).__name__}: {exc}", "status": "unavailable",
                   "traceback": traceback.format_exc()}
    except Exception as exc:  # reported as a row; the suite goes on
        payload = {"error": f"{type(exc).__name__}: {exc}", "status": "error",
                   "traceback": traceback.format_exc()}
    Path(result_path).write_text(json.dumps(payload, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------


def collect_cases(ctx: Context) -> list[Case]:
    cases: list[Case] = []
    for name in MODULES:
        mod = importlib.import_module(name)
        cases.extend(mod.cases(ctx))
    return cases


def _failure_rows(case: Case, ctx: Context, status: str, note: str) -> list[dict[str, Any]]:
    rows = case.expected_rows or [Row(case.name, None, "")]
    out = []
    for r in rows:
        # Toy sizes evaluate no targets, failed or not.
        target, comparison = (None, None) if ctx.tiny else (r.target, r.comparison)
        r2 = Row(r.name, None, r.unit, target, comparison, None, status, note, dict(r.extra))
        out.append(finish_row(r2).to_dict())
    return out


def run_case(case: Case, ctx: Context, verbose: bool) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(HERE / "run.py"),
            "--_worker", case.func,
            "--_ctx", ctx.to_json(),
            "--_kwargs", json.dumps(case.kwargs),
            "--_result", str(result),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(HERE), str(_SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
        if case.display and not env.get("DISPLAY") and shutil.which("xvfb-run"):
            cmd = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", *cmd]
            env["MIRROR_BENCH_XVFB"] = "1"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=case.timeout_s
            )
        except subprocess.TimeoutExpired:
            return _failure_rows(
                case, ctx, "timeout", f"case {case.name} ran past its {case.timeout_s:.0f} s limit"
            )
        wall = time.perf_counter() - t0
        if verbose and proc.stderr.strip():
            sys.stderr.write(proc.stderr)
        if not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return _failure_rows(
                case, ctx, "error", f"worker exited {proc.returncode}: {' | '.join(tail)}"
            )
        payload = json.loads(result.read_text())
        if "error" in payload:
            if verbose or payload["status"] == "error":
                sys.stderr.write(payload.get("traceback", ""))
            return _failure_rows(case, ctx, payload["status"], payload["error"])
        rows = payload["rows"]
        for r in rows:
            r.setdefault("case_wall_s", round(wall, 2))
        return rows


def _attach_matmul(rows: list[dict[str, Any]], rates: dict[str, float]) -> None:
    """Every figure carries the run's matmul rates; FLOP-bearing rows get a fraction."""
    for r in rows:
        r.setdefault("matmul_gflops_fp32", rates.get("fp32"))
        r.setdefault("matmul_gflops_bf16", rates.get("bf16"))
        prec = r.get("precision")
        if r.get("gflops") is not None and prec in rates and r.get("fraction_of_matmul") is None:
            r["fraction_of_matmul"] = r["gflops"] / rates[prec] if rates[prec] else None


def _clean(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON list of rows here")
    p.add_argument("--quick", action="store_true",
                   help="same sizes, fewer repeats; bf16 on a CPU without native bf16 is estimated")
    p.add_argument("--scale", choices=["full", "quick", "tiny"], default=None,
                   help="'tiny' = toy sizes for the smoke test (targets not evaluated)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--only", nargs="+", metavar="PATTERN",
                   help="run only cases whose name matches one of these (fnmatch, substring)")
    p.add_argument("--cache-dir", default=None,
                   help="where synthetic slides are kept between cases/runs "
                        "(default: <tmp>/mirror-bench-cache)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each case")
    p.add_argument("--case-timeout", type=float, default=None,
                   help="cap every case's subprocess timeout at this many seconds")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop starting new cases after this many seconds; the rest are "
                        "reported as skipped (keeps a GPU check inside its time limit)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_ctx", help=argparse.SUPPRESS)
    p.add_argument("--_kwargs", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        return _worker(args._worker, args._ctx, args._kwargs, args._result)

    scale = args.scale or ("quick" if args.quick else "full")
    device = _resolve_device(args.device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    cache_dir = args.cache_dir or str(Path(tempfile.gettempdir()) / "mirror-bench-cache")
    ctx = Context(device=device, scale=scale, cache_dir=cache_dir,
                  case_budget_s=CASE_BUDGET_S[scale], threads=args.threads)

    cases = collect_cases(ctx)
    if args.only:
        pats = args.only
        cases = [c for c in cases
                 if c.func.startswith("bench_matmul:")
                 or any(fnmatch.fnmatch(c.name, pt) or pt in c.name for pt in pats)]
    if args.list:
        for c in cases:
            print(f"{c.name:40s} {c.func} {json.dumps(c.kwargs)}")
        return 0
    if not args.out:
        p.error("--out FILE.json is required")

    info = machine_info(device)
    sys.stderr.write(
        f"[bench] scale={scale} device={device} cpu={info['cpu']!r} threads={info['torch_threads']} "
        f"torch={info['torch']} bf16_native_cpu={info['bf16_native_cpu']}\n"
    )
    all_rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    # Matmul first: its rates feed the estimates and the fractions of every later case.
    ordered = [c for c in cases if c.func.startswith("bench_matmul:")] + [
        c for c in cases if not c.func.startswith("bench_matmul:")
    ]
    for i, case in enumerate(ordered, 1):
        t0 = time.perf_counter()
        if args.case_timeout is not None:
            case.timeout_s = min(case.timeout_s, args.case_timeout)
        if args.deadline_s is not None:
            left = args.deadline_s - (t0 - t_start)
            if left < 10:
                sys.stderr.write(f"[bench] ({i}/{len(ordered)}) {case.name} skipped (deadline)\n")
                all_rows.extend(_failure_rows(case, ctx, "skipped",
                                              f"not started: --deadline-s {args.deadline_s:.0f} reached"))
                continue
            case.timeout_s = min(case.timeout_s, left)
        sys.stderr.write(f"[bench] ({i}/{len(ordered)}) {case.name} ...")
        sys.stderr.flush()
        rows = run_case(case, ctx, args.verbose)
        if case.func.startswith("bench_matmul:"):
            for r in rows:
                if r.get("value") is not None and r.get("precision"):
                    ctx.matmul_gflops[r["precision"]] = float(r["value"])
                    r["machine"] = info
        sys.stderr.write(f" {time.perf_counter() - t0:.1f} s\n")
        all_rows.extend(rows)
    _attach_matmul(all_rows, ctx.matmul_gflops)
    all_rows = _clean(all_rows)

    print(f"# napari-mirror benchmarks  scale={scale}  device={device}  "
          f"cpu={info['cpu']}  threads={info['torch_threads']}  torch={info['torch']}")
    rates = ", ".join(f"{k} {v:,.1f} GFLOP/s" for k, v in ctx.matmul_gflops.items())
    print(f"# matmul rate measured in this run: {rates or 'unavailable'}")
    if device == "cpu" and not info["bf16_native_cpu"]:
        print("# note: this CPU has no native bf16 matmul (no AVX512-BF16/AMX); bf16 runs far "
              "slower than fp32 here, and bf16 cases too slow to run are estimated from FLOPs.")
    print(format_table(all_rows))
    n_t = sum(1 for r in all_rows if r.get("target") is not None)
    n_met = sum(1 for r in all_rows if r.get("met") is True)
    print(f"# {n_met}/{n_t} targets met; total {time.perf_counter() - t_start:.0f} s")
    write_json_atomic(args.out, all_rows)
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
