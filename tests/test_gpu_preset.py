"""
Guards the gpu preset without a GPU: every method starts and finishes with `--preset gpu` on the
CPU, with the gpu preset's model (6 layers, 384 wide) and block size and its method settings,
but every count (steps, problems, samples, budgets; quiet_star's sequence) cut to the smallest
that runs each stage.
A size, shape or block-size error in a gpu run then shows up in CI, not on a rented GPU.

Run: python -m pytest tests/test_gpu_preset.py   (slow: about a minute on 2 cores)
"""

import json
import os

import pytest

import search
import train
from common import read_jsonl
from model import PRESETS

COUNTS = {  # the smallest counts that exercise every stage of each method
    "sft": ["--n-train", "4", "--n-test", "2", "--steps", "2", "--batch-size", "2",
            "--sample-batch-size", "8"],
    "star": ["--n-train", "4", "--n-unlabeled", "2", "--n-test", "2", "--steps", "2",
             "--batch-size", "2", "--sample-batch-size", "8", "--iterations", "1",
             "--star-steps", "1"],
    "vstar": ["--n-train", "4", "--n-unlabeled", "2", "--n-test", "2", "--steps", "2",
              "--batch-size", "2", "--sample-batch-size", "8", "--iterations", "1",
              "--samples", "2", "--eval-samples", "2", "--verifier-steps", "1",
              "--temperature", "1.5"],
    "search": ["--n-train", "4", "--n-unlabeled", "2", "--n-test", "2", "--steps", "2",
               "--batch-size", "2", "--sample-batch-size", "8", "--samples", "2",
               "--eval-samples", "2", "--verifier-steps", "1", "--rollouts", "1",
               "--budgets", "1,2"],
    "quiet_star": ["--base-steps", "2", "--think-steps", "2", "--eval-every", "2",
                   "--n-test", "2", "--batch-size", "2", "--seq-len", "32",
                   "--no-control-arm"],  # (the control arm: the same shapes, no REINFORCE)
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(COUNTS))
def test_every_method_runs_with_the_gpu_preset(method, tmp_path, monkeypatch):
    # an untrained model writes to the end of every budget: shorter search lines keep it quick
    monkeypatch.setattr(search, "ROLLOUT_TOKENS", 32)
    monkeypatch.setattr(search, "STEP_TOKENS", 12)
    out = str(tmp_path / method)
    train.main(["--method", method, "--preset", "gpu", "--device", "cpu", "--out", out]
               + COUNTS[method])
    config = json.load(open(os.path.join(out, "config.json")))
    gpu = PRESETS["gpu"]
    assert (config["model"]["n_layer"], config["model"]["n_embd"]) == (gpu.n_layer, gpu.n_embd)
    assert config["model"]["block_size"] >= gpu.block_size
    assert read_jsonl(os.path.join(out, "metrics.jsonl"))  # every stage committed its rows
    assert os.path.exists(os.path.join(out, "summary.md"))
