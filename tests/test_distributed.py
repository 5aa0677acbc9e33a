"""Gathered CLIP loss under torch.distributed equals the single-process loss on the global batch.

Runs ``torch.distributed.run --nproc-per-node 2`` (gloo, CPU) on tests/_dist_worker_clip.py and
compares (i) the mean over ranks of the per-rank loss with the single-process loss and (ii) the
DDP-averaged gradients with the single-process gradients, for equal and unequal local batches;
and (iii) that no gloo thread outlives ``destroy_process_group`` (a group kept alive by a stray
reference was torn down during interpreter shutdown instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts several processes (torch.distributed)

WORKER = Path(__file__).with_name("_dist_worker_clip.py")


def test_gathered_clip_loss_and_gradients_match_single_process(tmp_path):
    out = tmp_path / "result.json"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(Path(__file__).parents[1] / "src"),
        PYTHONWARNINGS="error::FutureWarning",  # no deprecated collectives
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(WORKER), str(out), "4,4;5,2",  # equal and unequal local batches
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["sizes"] for r in results] == [[4, 4], [5, 2]]
    for r in results:
        assert r["world"] == 2
        assert r["mean_loss"] == pytest.approx(r["ref_loss"], rel=1e-12)
        assert r["ref_grad_abs_sum"] > 1e-3  # the comparison is not between zeros
        assert r["max_grad_diff"] < 1e-12, r
        assert r["ranks_grad_diff"] == 0.0  # DDP leaves identical gradients on every rank
    # destroy_process_group really destroyed the group: no gloo thread survives into shutdown
    for rank in (0, 1):
        assert json.loads(Path(f"{out}.rank{rank}.threads").read_text()) == [], rank
