#!/usr/bin/env bash
# The ONE prepared GPU check of napari-mirror (written for one NVIDIA H200; < 10 minutes).
#
#   bash benchmarks/gpu_check.sh
#
# Results: $OUT when set (the device tool fetches it), else ${TMPDIR:-/tmp}/mirror-gpu-check.
#
# Steps, each under its own time limit (total at most ~9.5 min):
#   0. environment report (nvidia-smi, torch/CUDA, which optional packages are importable)  ~10 s
#   1. CUDA tests: `pytest -m cuda` when the project registers and uses a `cuda` marker;
#      otherwise (today) the CUDA smoke in step 2 is the CUDA test.                         <= 150 s
#   2. CUDA smoke: MIRROR forward/backward in bf16 autocast on the GPU (finite loss, every
#      parameter gets a finite gradient), GPU-vs-CPU agreement of encode_slide in fp32, a
#      20,000-tile encode_slide on the GPU (attention sums to 1), and feature extraction of
#      a small synthetic slide on the GPU vs the CPU (stain-texture, fp32).                 <= 120 s
#   3. `benchmarks/run.py --device cuda` (full sizes, bf16 autocast; CUDA max allocated
#      for memory), with a suite deadline so it ends in time.                              <= 330 s
# Exit status: 0 when steps 1-2 pass and step 3 wrote its JSON; 1 otherwise.
#
# Python: $PYTHON if set, else .venv/bin/python when it sees CUDA, else python3 (the device
# image's python3 holds a CUDA torch). Packages the image may lack (openslide, imagecodecs,
# napari, lifelines) only turn the rows that need them into "unavailable"/"error" rows.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
OUT_DIR="${OUT:-${TMPDIR:-/tmp}/mirror-gpu-check}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c \
      "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg QT_QPA_PLATFORM=offscreen
# Generated slides stay outside $OUT (only the few result files are fetched back from there).
CACHE="${TMPDIR:-/tmp}/mirror-bench-cache-gpu"
export NAPARI_MIRROR_CACHE="$CACHE/napari-mirror"   # plugin sample data, not the user's cache
status=0

# ---- 0. environment ----------------------------------------------------------------------
say "python: $PY"
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv) \
  2>&1 | tee -a "$LOG"
timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, sys
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())
for m in ("numpy", "scipy", "h5py", "safetensors", "tifffile", "imagecodecs", "openslide",
          "PIL", "pandas", "sklearn", "lifelines", "napari", "qtpy", "pytest"):
    try:
        importlib.import_module(m); print(f"  {m}: ok")
    except Exception as e:  # noqa: BLE001
        print(f"  {m}: MISSING ({type(e).__name__})")
sys.exit(0 if torch.cuda.is_available() else 3)
EOF
if [[ ${PIPESTATUS[0]} -ne 0 ]]; then
  say "FAIL: $PY sees no CUDA GPU; nothing else can run."
  exit 1
fi

# ---- 1. CUDA tests -------------------------------------------------------------------------
if grep -q '"cuda' pyproject.toml && grep -rqs "mark.cuda" tests; then
  say "step 1: pytest -m cuda"
  timeout -k 5 150 "$PY" -m pytest -m cuda -q -x -p no:cacheprovider tests 2>&1 | tail -n 40 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [[ $rc -ne 0 && $rc -ne 5 ]]; then say "FAIL: pytest -m cuda exited $rc"; status=1; fi
else
  say "step 1: no registered 'cuda' pytest marker in use; the CUDA smoke below is the CUDA test"
fi

# ---- 2. CUDA smoke -------------------------------------------------------------------------
say "step 2: CUDA smoke (model forward/backward, GPU vs CPU, extraction)"
MIRROR_SMOKE_CACHE="$CACHE" timeout -k 5 120 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import os, sys, time
from pathlib import Path
import torch
from mirror_model.models import create_model

dev = torch.device("cuda")
# Exact fp32 on the GPU for the GPU-vs-CPU comparisons (cuDNN convolutions default to TF32).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
fails = []
def check(ok, what):
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        fails.append(what)

torch.manual_seed(0)
# (a) forward/backward, bf16 autocast, authors' widths, small bag
m = create_model("mirror", patch_dim=1024, n_genes=1000).to(dev).train()
x = torch.randn(4, 512, 1024, device=dev); r = torch.randn(4, 1000, device=dev)
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = m(features=x, rna=r)
out.loss.float().backward()
check(bool(torch.isfinite(out.loss.float())), f"bf16 forward loss finite ({float(out.loss):.4f})")
params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
no_grad = [n for n, p in params if p.grad is None]
bad_grad = [n for n, p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
check(not no_grad, f"every parameter got a gradient ({len(no_grad)} without: {no_grad[:3]})")
check(not bad_grad, f"all gradients finite ({len(bad_grad)} non-finite: {bad_grad[:3]})")
check(all(p.grad.device.type == "cuda" for _, p in params if p.grad is not None), "gradients on CUDA")

# (b) GPU vs CPU agreement of encode_slide in fp32 (same weights)
m.eval()
xs = torch.randn(3000, 1024)
with torch.inference_mode():
    g = m.encode_slide(xs.to(dev))
    c = m.to("cpu").encode_slide(xs)
m.to(dev)
cos = torch.nn.functional.cosine_similarity(g.embedding.float().cpu(), c.embedding.float(), dim=-1).min()
att_err = (g.attention.float().cpu() - c.attention.float()).abs().max() / c.attention.float().max()
check(float(cos) > 0.999, f"encode_slide GPU vs CPU embedding cosine {float(cos):.6f} > 0.999")
check(float(att_err) < 1e-3,
      f"encode_slide GPU vs CPU attention max |diff| / max {float(att_err):.2e} < 1e-3")

# (c) 20,000 tiles on the GPU in bf16: attention is a distribution over the tiles
xb = torch.randn(20000, 1024, device=dev)
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
    e = m.encode_slide(xb)
torch.cuda.synchronize()
a = e.attention.float()
check(a.shape[-1] == 20000 and abs(float(a.sum()) - 1) < 1e-2 and bool(torch.isfinite(a).all()),
      f"encode_slide N=20000 bf16 attention sums to {float(a.sum()):.4f} "
      f"({time.perf_counter() - t0:.2f} s incl. first-call overhead, "
      f"{torch.cuda.max_memory_allocated() / 1e9:.2f} GB max allocated)")

# (d) extraction on the GPU vs the CPU (stain-texture, fp32), small synthetic slide
try:
    from mirror_model.extract import extract_features_in_memory
    from mirror_model.synth import synthesize_cohort
    root = Path(os.environ["MIRROR_SMOKE_CACHE"]) / "smoke-synth-1024"
    s = synthesize_cohort(root, n_patients=2, seed=0, slide_px=1024, overwrite=True)
    slide = s.slide_paths[0]
    fg = extract_features_in_memory(slide, "stain-texture", device="cuda", precision="fp32")
    fc = extract_features_in_memory(slide, "stain-texture", device="cpu", precision="fp32")
    same_coords = bool((fg.coords_level0 == fc.coords_level0).all())
    err = float(abs(fg.features - fc.features).max() / (abs(fc.features).max() + 1e-12))
    check(same_coords and fg.features.shape == fc.features.shape and err < 1e-3,
          f"extraction GPU vs CPU: {fg.features.shape[0]} tiles, same coords {same_coords}, "
          f"max relative diff {err:.2e}")
    fb = extract_features_in_memory(slide, "stain-texture", device="cuda", precision="bf16")
    check(bool((abs(fb.features) < float("inf")).all()), "extraction bf16 on GPU finite")
except ImportError as exc:
    print(f"SKIP extraction smoke: {exc}")
print("SMOKE", "FAILED: " + "; ".join(fails) if fails else "PASSED")
sys.exit(1 if fails else 0)
EOF
rc=${PIPESTATUS[0]}
if [[ $rc -ne 0 ]]; then say "FAIL: CUDA smoke exited $rc"; status=1; fi

# ---- 3. benchmarks on CUDA -----------------------------------------------------------------
say "step 3: benchmarks/run.py --device cuda"
timeout -k 10 330 "$PY" benchmarks/run.py --device cuda --out "$OUT_DIR/bench_cuda.json" \
  --cache-dir "$CACHE" --case-timeout 150 --deadline-s 300 2>&1 | tee "$OUT_DIR/bench_cuda.txt" | tee -a "$LOG"
if [[ ! -s "$OUT_DIR/bench_cuda.json" ]]; then say "FAIL: run.py --device cuda wrote no JSON"; status=1; fi

say "done: status $status; results in $OUT_DIR (gpu_check.log, bench_cuda.json, bench_cuda.txt)"
exit $status
