"""
Guards the torchrun path on a CPU: two processes with the gloo backend.

- each process samples a disjoint share of the problems, their union is all of them, and the
  gathered texts equal one process sampling everything (seeds belong to problems, not batches);
- one DistributedDataParallel step on a global batch, in length buckets with no_sync between
  them (star.batch_backward), gives the single-process gradients of one padded pass;
- a tiny STaR run finishes, only rank 0 wrote files, and a second run with the same seed and
  process count gives identical metrics, samples and kept rationales;
- a tiny search run finishes with every stage, only rank 0 writes, and two processes redoing
  one process's searches (its pool, beam search and MCTS stages, on its trained models) give
  exactly its metrics: a problem's search does not depend on the process that ran it;
- a tiny Quiet-STaR run: only rank 0 writes, a rerun gives identical metrics, and one process
  gives the same up to float rounding (DDP sums the gradients of the shares in another order).

Run: python -m pytest tests/test_distributed.py  (starts torchrun itself; about 75 s on 2 cores)
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


def torchrun(*args, alone=False):
    """tests/dist_worker.py in two processes under torchrun; alone: in one plain process (no
    torchrun, no process group: what python train.py runs)."""
    cmd = [sys.executable, WORKER, *args] if alone else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
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
    assert [r.get("iteration", r["kind"]) for r in m1] == [0, 1, 2, "control"]
    w0, w1 = (json.load(open(tmp_path / "log_a" / f"writes_rank{r}.json")) for r in (0, 1))
    assert any(w.endswith("metrics.jsonl") for w in w0)
    assert any(w.endswith(".pt") for w in w0)
    assert [w for w in w1 if w != os.devnull] == []  # rank 1 wrote nothing (stdout: devnull)
    m2, f2 = star_run(tmp_path / "b", tmp_path / "log_b")
    assert m1 == m2 and f1 == f2
    assert f1  # samples and kept files were compared


def metrics(out):
    """A run's metrics rows without wall times, as JSON text (so that NaN equals NaN)."""
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [json.dumps({k: v for k, v in r.items() if k != "wall_s"}, sort_keys=True)
            for r in rows]


def only_rank0_wrote(log):
    w0, w1 = (json.load(open(log / f"writes_rank{r}.json")) for r in (0, 1))
    return any(w.endswith("metrics.jsonl") for w in w0) and \
        [w for w in w1 if w != os.devnull] == []  # rank 1: nothing (stdout: devnull)


SEARCH = ["--method", "search", "--n-train", "6", "--n-unlabeled", "2", "--n-test", "3",
          "--steps", "40", "--verifier-steps", "2", "--eval-samples", "2", "--budgets", "1,2",
          "--samples", "2", "--rollouts", "2", "--batch-size", "4", "--train-difficulty", "2",
          "--test-difficulty", "2-3", "--device", "cpu"]  # (numbers 2 3 2: a share lacks a count)


def test_tiny_search_run_splits_the_problems_and_searches_as_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun("search", str(tmp_path), *SEARCH, "--out", str(one), alone=True)
    # two processes, every stage (the training ones through DDP): only rank 0 writes
    torchrun("search", str(tmp_path), *SEARCH, "--out", str(two))
    assert only_rank0_wrote(tmp_path)
    assert [json.loads(r)["stage"] for r in metrics(two)] == \
        [json.loads(r)["stage"] for r in metrics(one)]
    # the searches proper, on one process's trained models: two processes redo its pool, beam
    # search and MCTS stages (3 test problems: shares of 2 and 1) and give the same rows
    alone_rows = metrics(one)
    trained = [line for line in open(one / "metrics.jsonl")
               if json.loads(line)["stage"] in ("generator", "labels", "scorers")]
    with open(one / "metrics.jsonl", "w") as f:  # the later stages are not done yet
        f.writelines(trained)
    torchrun("search", str(tmp_path), *SEARCH, "--out", str(one))
    assert metrics(one) == alone_rows
    assert len(alone_rows) > len(trained) + 10  # every method's rows were compared
    tokens = [json.loads(r).get("tokens") for r in alone_rows]
    assert len({json.dumps(t) for t in tokens if isinstance(t, list)}) > 3  # and they differ


QUIET = ["--method", "quiet_star", "--base-steps", "3", "--think-steps", "4", "--eval-every",
         "2", "--n-test", "200", "--seq-len", "24", "--thought-len", "2", "--batch-size", "4",
         "--train-difficulty", "2", "--test-difficulty", "2", "--device", "cpu"]


def close(a, b):
    """Equal up to float rounding, at any depth of nested dicts and lists."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(a))
    return a == b


def test_tiny_quiet_star_run_rank0_writes_and_matches_one_process(tmp_path):
    # 200 test lines, about 80 rows: two evaluation batches of 64, so both processes evaluate
    # (that the same seed gives the same metrics under torchrun: the star test above)
    a, one = tmp_path / "a", tmp_path / "one"
    torchrun("train", str(tmp_path), *QUIET, "--out", str(a))
    assert only_rank0_wrote(tmp_path)
    assert [json.loads(r)["step"] for r in metrics(a)] == [0, 2, 4]
    # DDP steps on shares of each batch are one process's steps on the whole batch, up to the
    # order of the gradient sums
    torchrun("train", str(tmp_path), *QUIET, "--out", str(one), alone=True)
    assert close([json.loads(r) for r in metrics(a)], [json.loads(r) for r in metrics(one)])
