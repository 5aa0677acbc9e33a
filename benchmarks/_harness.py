"""Shared machinery of the benchmark suite: rows, timing, matmul rate, memory, FLOPs, tables.

Every benchmark module exposes ``cases(ctx) -> list[Case]``; each case runs in a fresh
subprocess (``run.py --_worker``) so that peak resident set size (RSS) is that case's own.
A case returns a list of :class:`Row`; :func:`finish_row` fills in ``met`` and ``shortfall``.

Units: times in seconds (``s``), rates in GFLOP/s or tiles/s, memory in GB (10**9 bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

GB = 1e9

# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of the results table (one JSON object).

    ``target`` is a number in ``unit`` and ``comparison`` says which side of it passes
    (``"<="``: at most, ``">="``: at least). ``met`` is None when there is no target or no
    value (not measured). ``status`` is ``"ok"``, ``"skipped"``, ``"unavailable"`` (a
    dependency is missing), ``"timeout"`` or ``"error"``.
    """

    name: str
    value: float | None
    unit: str
    target: float | None = None
    comparison: str | None = None  # "<=" | ">="
    met: bool | None = None
    status: str = "ok"
    note: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": self.target,
            "comparison": self.comparison,
            "met": self.met,
            "status": self.status,
            "note": self.note,
        }
        for k, v in self.extra.items():
            if k not in d:
                d[k] = v
        return d


REQUIRED_KEYS = ("name", "value", "unit", "target", "met")


def finish_row(row: Row) -> Row:
    """Decide ``met`` and, when missed, ``shortfall`` (a fraction of the target).

    For ``<=`` targets the shortfall is ``value/target - 1`` (0.5 = 50 % over the limit);
    for ``>=`` targets it is ``1 - value/target`` (0.25 = 25 % below the floor).
    A row whose value is missing but which has a target is not met (unless a benchmark
    set ``met`` itself, e.g. from an estimate).
    """
    if row.target is None or row.comparison is None:
        return row
    if row.value is None or (isinstance(row.value, float) and math.isnan(row.value)):
        if row.met is None and row.status in ("timeout", "error", "skipped"):
            row.met = False
        return row
    v, t = float(row.value), float(row.target)
    if row.comparison == "<=":
        row.met = v <= t
        if not row.met:
            row.extra["shortfall"] = (v / t - 1.0) if t > 0 else math.inf
            row.extra["shortfall_text"] = (
                f"{v - t:.3g} {row.unit} over the target ({v / t:.2f}x the limit)"
                if t > 0
                else f"{v:.3g} {row.unit} over a zero target"
            )
    elif row.comparison == ">=":
        row.met = v >= t
        if not row.met:
            row.extra["shortfall"] = 1.0 - v / t if t > 0 else math.inf
            row.extra["shortfall_text"] = (
                f"{t - v:.3g} {row.unit} short of the target ({100 * (1 - v / t):.0f} % below)"
            )
    else:  # pragma: no cover - programming error in a benchmark
        raise ValueError(f"unknown comparison {row.comparison!r} in row {row.name}")
    return row


# ---------------------------------------------------------------------------------------------
# Context passed to every case (JSON-serialisable)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What a case needs to know about the run.

    ``scale``: ``"full"`` (the issue's sizes, several repeats), ``"quick"`` (same sizes,
    fewer repeats, expensive bf16-on-slow-CPU cases estimated instead of run) or ``"tiny"``
    (toy sizes for the smoke test: targets are not evaluated).
    ``matmul_gflops``: the run's matmul rate per precision (filled by run.py after the
    matmul case), used for estimates and reported next to every figure.
    """

    device: str = "cpu"
    scale: str = "full"
    cache_dir: str = ""
    matmul_gflops: dict[str, float] = dataclasses.field(default_factory=dict)
    case_budget_s: float = 300.0
    threads: int | None = None

    @property
    def quick(self) -> bool:
        return self.scale != "full"

    @property
    def tiny(self) -> bool:
        return self.scale == "tiny"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Context:
        return cls(**json.loads(text))


@dataclasses.dataclass
class Case:
    """A unit of work run in its own subprocess: ``module:function`` -> list[Row]."""

    name: str
    func: str  # "bench_module:function"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    timeout_s: float = 600.0
    # Needs an X display (a napari viewer): run under `xvfb-run -a` when there is none.
    display: bool = False
    # Rows to emit (with status "timeout"/"error") when the worker dies before reporting.
    expected_rows: list[Row] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


def torch_device(name: str):
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is False")
    return torch.device(name)


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def autocast_ctx(device, precision: str) -> Iterator[None]:
    """bf16 autocast on the device (never fp16); a no-op for fp32."""
    import torch

    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def bf16_native_on_cpu() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX512-BF16 / AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - older torch
        return False


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Wall-clock times (s) of the timed repeats; ``median_s`` is what rows report."""

    times_s: list[float]
    # Process CPU time (all threads) of each timed repeat: cpu_s / (wall * threads) near 1
    # means the process had its cores; far below 1 means neighbours were using them.
    cpu_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    def cpu_utilization(self) -> float | None:
        """Mean CPU time / (wall time x torch threads) over the repeats (1.0 = uncontended)."""
        import torch

        if not self.cpu_s:
            return None
        threads = max(1, torch.get_num_threads())
        return sum(self.cpu_s) / (sum(self.times_s) * threads)

    def extra(self) -> dict[str, Any]:
        util = self.cpu_utilization()
        return {
            "repeats": len(self.times_s),
            "times_s": [round(t, 4) for t in self.times_s],
            "min_s": round(self.min_s, 4),
            "cpu_utilization": None if util is None else round(util, 3),
        }


def time_fn(
    fn: Callable[[], Any],
    device,
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = None,
) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then up to ``repeats`` timed runs.

    Stops early (after at least one timed run) when ``budget_s`` of timed work is spent,
    so a slow machine does not blow the suite's time limit.
    """
    for _ in range(warmup):
        fn()
        synchronize(device)
    times: list[float] = []
    cpu: list[float] = []
    spent = 0.0
    for _ in range(max(1, repeats)):
        synchronize(device)
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        cpu.append(time.process_time() - c0)
        spent += dt
        if budget_s is not None and spent >= budget_s:
            break
    return Timing(times, cpu)


# ---------------------------------------------------------------------------------------------
# Matmul rate
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MatmulRate:
    precision: str
    n: int
    gflops: float
    timing: Timing


def measure_matmul_rate(
    device,
    precision: str,
    budget_s: float = 3.0,
    max_n: int | None = None,
    repeats: int = 7,
    min_n: int | None = None,
) -> MatmulRate:
    """Median GFLOP/s of an ``n x n @ n x n`` matmul (2 n^3 FLOPs) in fp32 or bf16.

    ``n`` starts at ``min_n`` (CPU: 1024, or 256 for bf16 on a CPU without native bf16, where
    bf16 runs at ~1 GFLOP/s; CUDA: 4096) and doubles until one product takes >= 50 ms or
    ``max_n`` is reached (4096 on CPU, 8192 on CUDA). Small products are avoided because on a
    busy machine their time is dominated by thread wake-up latency, not arithmetic.
    bf16 means bf16 inputs and outputs (what autocast feeds to linear layers).
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    if max_n is None:
        max_n = 8192 if device.type == "cuda" else 4096
    if min_n is None:
        if device.type == "cuda":
            min_n = 4096
        elif precision == "bf16" and not bf16_native_on_cpu():
            min_n = 256
        else:
            min_n = 1024
    n = min(min_n, max_n)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(n_: int):
        a = torch.randn(n_, n_, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n_, n_, generator=gen).to(device=device, dtype=dtype)
        return a, b

    while True:
        a, b = make(n)
        torch.matmul(a, b)  # warm-up (kernel selection, page faults)
        synchronize(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        dt = time.perf_counter() - t0
        if dt >= 0.05 or n >= max_n or dt * 8 > budget_s:
            break
        n *= 2
    per_budget = max(1, int(budget_s / max(dt, 1e-6)))
    timing = time_fn(lambda: torch.matmul(a, b), device, repeats=min(repeats, per_budget), warmup=0)
    flops = 2.0 * n**3
    return MatmulRate(precision, n, flops / timing.median_s / 1e9, timing)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(ru if sys.platform == "darwin" else ru * 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return peak_rss_bytes()


def reset_cuda_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> tuple[float, str]:
    """(GB, kind): CUDA max allocated on CUDA, else the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB, "cuda_max_allocated"
    return peak_rss_bytes() / GB, "peak_rss"



@dataclasses.dataclass
class Throughput:
    """A timed function against the matmul rate measured right before and after it."""

    timing: Timing
    flops: float
    matmul_gflops_adjacent: float  # mean of the two matmul rates around the timed runs
    peak_gb: float  # measured after the timed runs (see peak_memory)
    memory_kind: str

    @property
    def gflops(self) -> float:
        return self.flops / self.timing.median_s / 1e9

    @property
    def fraction_of_matmul(self) -> float:
        return self.gflops / self.matmul_gflops_adjacent

    def extra(self) -> dict[str, Any]:
        return {**self.timing.extra(), "flops": self.flops, "gflops": self.gflops,
                "fraction_of_matmul": self.fraction_of_matmul,
                "matmul_gflops_adjacent": self.matmul_gflops_adjacent}


def time_against_matmul(
    fn: Callable[[], Any],
    device,
    precision: str,
    flops: float,
    *,
    repeats: int,
    warmup: int,
    budget_s: float | None,
    rate_budget_s: float,
) -> Throughput:
    """:func:`time_fn` between two :func:`measure_matmul_rate` runs (so the fraction of the
    machine's matmul rate is against what the machine gave right then), then the peak memory."""
    before = measure_matmul_rate(device, precision, budget_s=rate_budget_s)
    timing = time_fn(fn, device, repeats=repeats, warmup=warmup, budget_s=budget_s)
    after = measure_matmul_rate(device, precision, budget_s=rate_budget_s)
    mem_gb, mem_kind = peak_memory(device)
    return Throughput(timing, flops, 0.5 * (before.gflops + after.gflops), mem_gb, mem_kind)


# ---------------------------------------------------------------------------------------------
# FLOPs and tensor shapes
# ---------------------------------------------------------------------------------------------


def conv_flops(x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int],
               transposed: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one convolution, any number of groups.

    Every output position of every sample multiplies each kernel tap of each output channel
    with the ``C_in / groups`` input channels of its group: ``2 · B · C_out · C_in/g · prod(out
    spatial) · prod(kernel)``. The weight ``[C_out, C_in/g, *k]`` carries exactly the two channel
    factors (for a transposed convolution ``[C_in, C_out/g, *k]`` over the *input* positions).
    """
    spatial = (x_shape if transposed else out_shape)[2:]
    return 2 * int(x_shape[0]) * math.prod(spatial) * math.prod(w_shape)


def conv_backward_flops(grad_out_shape: Sequence[int], x_shape: Sequence[int],
                        w_shape: Sequence[int], transposed: bool,
                        output_mask: Sequence[bool]) -> int:
    """FLOPs of ``aten.convolution_backward``: each requested gradient (input, weight) is the
    same multiply-adds as the forward, rearranged (``grad_x = convᵀ(grad_out, w)``,
    ``grad_w = Σ grad_out ⊗ x`` per group); bias gradients are sums, not counted.

    torch's own formula (``torch.utils.flop_counter.conv_backward_flop``) counts the weight
    gradient as a dense convolution of ``xᵀ`` with ``grad_outᵀ``, i.e. ``groups`` times too
    many: a depthwise 7×7 conv on ``[8, 768, 16, 16]`` has 0.154 GFLOP forward and 0.308 GFLOP
    backward, which torch counts as 118.5 GFLOP.
    """
    fwd = conv_flops(x_shape, w_shape, grad_out_shape, transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _flop_mapping() -> dict[Any, Any]:
    """Formulas where FlopCounterMode is wrong or blind.

    * ``convolution_backward``: torch over-counts the weight gradient of grouped convolutions
      by the number of groups (see :func:`conv_backward_flops`); ours counts it per group.
    * The CPU flash-attention kernels of SDPA: torch's counter knows the CUDA SDPA kernels but
      not ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), so on CPU
      attention FLOPs would silently count as zero. The same formulas are used:
      4·B·H·Lq·Lk·d forward (QKᵀ and PV), twice that backward.
    """
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping: dict[Any, Any] = {}

    def fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    def conv_bwd(grad_out, x, w, _bias, _stride, _padding, _dilation, transposed,
                 _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
        return conv_backward_flops(grad_out, x, w, transposed, output_mask)

    mapping[aten.convolution_backward] = conv_bwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def _counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_flop_mapping())


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn`` under :class:`torch.utils.flop_counter.FlopCounterMode`.

    Returns (total FLOPs, fn's result). The counter counts matmul, convolution and
    attention kernels (forward and, if ``fn`` calls backward, backward; CPU SDPA kernels
    included and grouped-convolution backward corrected, see :func:`_flop_mapping`);
    element-wise ops are not counted, so achieved-FLOP/s figures are conservative.
    """
    with _counter() as counter:
        out = fn()
    return int(counter.get_total_flops()), out


def flops_by_op(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs per aten op (for profiling reports)."""
    with _counter() as counter:
        fn()
    totals = counter.get_flop_counts().get("Global", {})
    return {str(k): int(v) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


class ShapeWatch:
    """A TorchDispatchMode that records every op output's shape (nothing is kept alive).

    Used to prove that no N x N matrix is ever built: :meth:`violations` lists outputs with
    two dimensions >= ``n`` or with >= ``n*n`` elements.
    """

    def __init__(self, n: int) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.n = int(n)
        self.largest_numel = 0
        self.largest_shape: tuple[int, ...] = ()
        self.largest_op = ""
        self.bad: list[tuple[str, tuple[int, ...]]] = []
        watch = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                watch._see(str(func), out)
                return out

        self._mode = _Mode()

    def _see(self, op: str, out: Any) -> None:
        import torch

        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            if not isinstance(t, torch.Tensor):
                continue
            shape = tuple(int(s) for s in t.shape)
            numel = math.prod(shape) if shape else 1
            if numel > self.largest_numel:
                self.largest_numel, self.largest_shape, self.largest_op = numel, shape, op
            big_dims = sum(1 for s in shape if s >= self.n)
            if big_dims >= 2 or numel >= self.n * self.n:
                self.bad.append((op, shape))

    def __enter__(self) -> ShapeWatch:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    def violations(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(self.bad)


def top_ops_profile(fn: Callable[[], Any], top: int = 8) -> list[dict[str, Any]]:
    """Self CPU/CUDA time of the heaviest aten ops in one call of ``fn`` (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1000.0, 2),
            "share": round(e.self_cpu_time_total / total, 3),
            "calls": int(e.count),
        }
        for e in rows
    ]


# ---------------------------------------------------------------------------------------------
# Machine description and table
# ---------------------------------------------------------------------------------------------


def machine_info(device_name: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "bf16_native_cpu": bf16_native_on_cpu(),
        "device": device_name,
    }
    try:
        info["loadavg_1min"] = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        pass
    if device_name.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "?"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: name, value, unit, target, met, precision, GFLOP/s, % of matmul,
    CPU utilisation of the timed region (100 % = the process had its cores), note."""
    headers = ["name", "value", "unit", "target", "met", "prec", "GFLOP/s", "%matmul", "cpu", "note"]
    lines = []
    for r in rows:
        target = "-"
        if r.get("target") is not None:
            target = f"{r.get('comparison') or ''} {_fmt(r['target'])}".strip()
        frac = r.get("fraction_of_matmul")
        util = r.get("cpu_utilization")
        note = r.get("note") or ""
        if r.get("met") is False and r.get("shortfall_text"):
            note = (r["shortfall_text"] + ("; " + note if note else "")).strip()
        if r.get("status") not in (None, "ok"):
            note = f"[{r['status']}] {note}".strip()
        lines.append(
            [
                str(r.get("name")),
                _fmt(r.get("value")),
                str(r.get("unit") or ""),
                target,
                _fmt(r.get("met")),
                str(r.get("precision") or "-"),
                _fmt(r.get("gflops")),
                "-" if frac is None else f"{100 * frac:.0f}%",
                "-" if util is None else f"{100 * util:.0f}%",
                note,
            ]
        )
    widths = [len(h) for h in headers]
    for line in lines:
        for i, cell in enumerate(line[:-1]):
            widths[i] = max(widths[i], len(cell))
    out = []
    fmt_line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(widths[i]) if i < len(cells) - 1 else c for i, c in enumerate(cells)
    )
    out.append(fmt_line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(fmt_line(line) for line in lines)
    return "\n".join(out)


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON next to ``path`` then rename over it (no half-written results)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, target)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)
