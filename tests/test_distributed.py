"""
Guards the torchrun path (issue 8) on a CPU: two processes with the gloo backend.

- each process samples a disjoint share of the problems, their union is all of them, and the
  gathered texts equal one process sampling everything (seeds belong to problems, not batches);
- one DistributedDataParallel step on a global batch gives the single-process gradients;
- a tiny STaR run finishes, only rank 0 wrote files, and a second run with the same seed and
  process count gives identical metrics, samples and kept rationales.

Run: python -m pytest tests/test_distributed.py  (starts torchrun itself; about 30 s on 2 cores)
"""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is not available")]


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           WORKER, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_sampling_shares_and_ddp_gradients(tmp_path):
    torchrun("checks", str(tmp_path))
    r0, r1 = (json.load(open(tmp_path / f"checks_rank{r}.json")) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    share0, share1 = ({tuple(p) for p in s} for s in r0["shares"])
    every = {tuple(p) for p in r0["all_prompts"]}
    assert share0 and share1 and not share0 & share1
    assert share0 | share1 == every
    # both processes got every text back, and they are the texts of one process doing it all
    assert r0["texts"] == r1["texts"] == r0["alone"] == r1["alone"]
    assert len({t for ts in r0["texts"] for t in ts}) > 11  # the samples really differ
    for r in (r0, r1):  # float64: the only difference is the order of the sums
        assert r["grad_scale"] > 1e-3 and r["grad_diff"] < 1e-10 * max(1.0, r["grad_scale"])


def star_run(out, log):
    os.makedirs(log, exist_ok=True)
    torchrun("train", str(log), "--method", "star", "--n-train", "24", "--n-unlabeled", "24",
             "--n-test", "12", "--steps", "10", "--star-steps", "6", "--iterations", "2",
             "--batch-size", "8", "--temperature", "1.0", "--device", "cpu", "--out", str(out))
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for row in metrics:
        row.pop("wall_s")
    files = {name: open(out / name).read() for name in sorted(os.listdir(out))
             if name.endswith(".txt") or name.startswith("kept")}
    return metrics, files


def test_tiny_star_run_rank0_writes_and_same_seed_same_metrics(tmp_path):
    m1, f1 = star_run(tmp_path / "a", tmp_path / "log_a")
    assert [r["iteration"] for r in m1] == [0, 1, 2]
    w0, w1 = (json.load(open(tmp_path / "log_a" / f"writes_rank{r}.json")) for r in (0, 1))
    assert any(w.endswith("metrics.jsonl") for w in w0)
    assert any(w.endswith(".pt") for w in w0)
    assert [w for w in w1 if w != os.devnull] == []  # rank 1 wrote nothing (stdout: devnull)
    m2, f2 = star_run(tmp_path / "b", tmp_path / "log_b")
    assert m1 == m2 and f1 == f2
    assert f1  # samples and kept files were compared
