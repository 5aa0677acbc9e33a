"""Reading an expression table: time and peak memory of ``read_expression`` at TCGA size.

The tables are 1,000 samples x 60,000 genes (tiny scale: 20 x 300), written once into the
cache folder (untimed) as CSV and TSV in both orientations (samples x genes: one row per
sample; genes x samples: one row per gene, the usual TCGA/GEO layout).

Generative model of the values (seed 0): log2(TPM + 1)-like. Gene g has a level
mu_g ~ max(0, N(3, 2)) (30 % of genes are lowly expressed, mu_g = 0.3) and a spread
s_g ~ U(0.2, 1.5); a value is max(0, mu_g + s_g * N(0, 1)), written with 3 decimals.
Sample IDs are TCGA-style barcodes, genes Ensembl IDs with a version suffix.

What is timed: ``mirror_model.expression.read_expression(path)`` in a fresh process (the
case's own subprocess), i.e. parsing, orientation detection and every check of the reader.
Rows: ``expression_read_{csv,tsv}_{sxg,gxs}`` (s; target <= 10 s on 2 cores) and
``..._mem`` (peak RSS growth while reading, as a multiple of the float32 matrix
``samples x genes x 4`` bytes; target <= 3).
"""

from __future__ import annotations

import time
from pathlib import Path

from _harness import Case, Context, Row, current_rss_bytes, peak_rss_bytes

TARGET_S = 10.0
TARGET_MEM_RATIO = 3.0
LAYOUTS = [(fmt, orient) for fmt in ("csv", "tsv") for orient in ("sxg", "gxs")]


def _shape(ctx: Context) -> tuple[int, int]:
    return (20, 300) if ctx.tiny else (1000, 60000)


def cases(ctx: Context) -> list[Case]:
    t, c = (None, None) if ctx.tiny else (TARGET_S, "<=")
    m = None if ctx.tiny else TARGET_MEM_RATIO
    return [
        Case(
            f"expression_read_{fmt}_{orient}",
            "bench_expression:run",
            {"fmt": fmt, "orient": orient},
            timeout_s=600,
            expected_rows=[
                Row(f"expression_read_{fmt}_{orient}", None, "s", t, c),
                Row(f"expression_read_{fmt}_{orient}_mem", None, "x float32", m, c),
            ],
        )
        for fmt, orient in LAYOUTS
    ]


def write_table(path: Path, n_samples: int, n_genes: int, sep: str, samples_as_rows: bool) -> None:
    """Write one table of the documented generative model (fast: preformatted value strings)."""
    import numpy as np

    rng = np.random.default_rng(0)
    mu = np.maximum(0.0, rng.normal(3.0, 2.0, n_genes))
    mu[rng.random(n_genes) < 0.3] = 0.3
    sd = rng.uniform(0.2, 1.5, n_genes)
    genes = [f"ENSG{100000 + g:011d}.{g % 20 + 1}" for g in range(n_genes)]
    samples = [
        f"TCGA-{chr(65 + i % 26)}{chr(65 + i // 26 % 26)}-{i:04d}-01A" for i in range(n_samples)
    ]
    # values in thousandths, looked up in a table of their 3-decimal strings
    milli = np.rint(
        np.maximum(0.0, mu + sd * rng.standard_normal((n_samples, n_genes))) * 1000
    ).astype(np.int64)
    lookup = np.array([f"{k / 1000:.3f}" for k in range(int(milli.max()) + 1)], dtype=object)
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "w") as fh:
        if samples_as_rows:
            fh.write(sep.join(["sample_id", *genes]) + "\n")
            for i in range(n_samples):
                fh.write(samples[i] + sep + sep.join(lookup[milli[i]]) + "\n")
        else:
            fh.write(sep.join(["gene_id", *samples]) + "\n")
            cols = np.ascontiguousarray(milli.T)
            for g in range(n_genes):
                fh.write(genes[g] + sep + sep.join(lookup[cols[g]]) + "\n")
    tmp.replace(path)


def table_path(ctx: Context, fmt: str, orient: str) -> Path:
    s, g = _shape(ctx)
    root = Path(ctx.cache_dir) / f"expression-{s}x{g}"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{orient}.{fmt}"
    if not path.is_file():
        write_table(path, s, g, "\t" if fmt == "tsv" else ",", orient == "sxg")
    return path


def run(ctx: Context, fmt: str, orient: str) -> list[Row]:
    from mirror_model.expression import read_expression

    path = table_path(ctx, fmt, orient)
    s, g = _shape(ctx)
    f32 = s * g * 4
    # warm-up on a toy table: lazy imports and parser set-up are not part of the growth
    warm = Path(ctx.cache_dir) / f"expression-warmup.{fmt}"
    if not warm.is_file():
        write_table(warm, 3, 5, "\t" if fmt == "tsv" else ",", orient == "sxg")
    read_expression(warm)
    base_rss = current_rss_bytes()
    base_peak = peak_rss_bytes()
    c0, t0 = time.process_time(), time.perf_counter()
    table = read_expression(path)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    # growth of the peak over what the process held before reading (imports, the interpreter)
    grown = peak_rss_bytes() - max(base_rss, 0)
    if peak_rss_bytes() == base_peak:  # the reading never raised the peak
        grown = max(0, current_rss_bytes() - base_rss)
    assert table.values.shape == (s, g), table.values.shape
    name = f"expression_read_{fmt}_{orient}"
    t, c = (None, None) if ctx.tiny else (TARGET_S, "<=")
    extra = {
        "shape": [s, g],
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "float32_mb": round(f32 / 1e6, 1),
        "orientation": table.orientation,
        "cpu_utilization": round(cpu / dt, 3) if dt > 0 else None,
    }
    return [
        Row(name, dt, "s", t, c, extra=extra),
        Row(
            f"{name}_mem",
            grown / f32,
            "x float32",
            None if ctx.tiny else TARGET_MEM_RATIO,
            c,
            extra={**extra, "peak_growth_mb": round(grown / 1e6, 1)},
        ),
    ]
