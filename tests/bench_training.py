"""
Benchmark: how much of a training batch is real tokens, and what a step costs, with one padded
forward pass (star.batch_loss, the textbook way) against length buckets (star.batch_backward,
what star.finetune runs and every method that fine-tunes through it).

  python tests/bench_training.py                  # tiny preset, STaR's and V-STaR's data
  python tests/bench_training.py --steps 40 --batch-size 64

For each task's default training examples (300 problems at the CPU training difficulties with
their gold rationales, and their hinted copies, as STaR's P) it prints:
- token utilisation, real tokens / tokens computed, over 200 random batches (the same batches
  for both ways);
- milliseconds per training step (forward, backward, optimizer), the median of --steps steps of
  each way, alternating, on the same weights;
- the fit of a step's time to a + b * tokens over fixed-shape batches, and a / b: what one more
  forward pass costs in tokens, the figure behind star.BUCKET_OVERHEAD.
Not collected by pytest (no test_ prefix).
"""

import argparse
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import star  # noqa: E402
from model import GPT, get_config  # noqa: E402
from tasks import get_task, sample_problems  # noqa: E402


def utilisation(batches):
    """(padded, bucketed) shares of computed tokens that are real tokens."""
    real = padded = bucketed = 0
    for batch in batches:
        lengths = [len(p) + len(c) - 1 for p, c in batch]
        real += sum(lengths)
        padded += len(batch) * max(lengths)
        bucketed += sum(len(b) * max(lengths[i] for i in b) for b in star.length_buckets(lengths))
    return real / padded, real / bucketed


def step_times(model, batches, device):
    """Median seconds per step of each way, alternating on the same batches."""
    opt = model.configure_optimizer(1e-4)
    ways = {"padded": lambda b: star.batch_loss(model, b, device).backward(),
            "bucketed": lambda b: star.batch_backward(model, b, device)}
    times = {name: [] for name in ways}
    for k, batch in enumerate(batches):
        for name in (list(ways) if k % 2 else list(ways)[::-1]):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            ways[name](batch)
            opt.step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def overhead_in_tokens(model, device, reps=5):
    """Fit step time = a + b * (B * T) over fixed shapes; a / b is a pass's fixed cost in tokens."""
    opt = model.configure_optimizer(1e-4)
    xs, ys = [], []
    for B in (4, 8, 16, 32):
        for T in (16, 32, 64, 96):
            idx = torch.randint(0, 90, (B, T), device=device)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(idx).view(-1, 100), idx.view(-1)).backward()
                opt.step()
                ts.append(time.perf_counter() - t0)
            xs.append(B * T)
            ys.append(statistics.median(ts[1:]))
    b, a = np.polyfit(xs, ys, 1)
    return a, b


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each way")
    ap.add_argument("--tasks", nargs="+", default=["addition", "countdown"])
    args = ap.parse_args()
    device = "cpu"
    torch.manual_seed(0)
    model = GPT(get_config(args.preset)).to(device)
    print(f"preset {args.preset}, batch {args.batch_size}, {torch.get_num_threads()} threads\n")
    print("| task | utilisation padded | bucketed | ms/step padded | bucketed "
          "| padded / bucketed |")
    print("|---|---|---|---|---|---|")
    for name in args.tasks:
        task = get_task(name)
        train_d = task.default_difficulties["cpu"][0]
        lo, hi = (int(x) for x in train_d.split("-"))
        P = sample_problems(task, 300, range(lo, hi + 1), seed=0)
        examples = star.gold_examples(task, P)
        rng = random.Random(0)
        draw = lambda n: [[examples[rng.randrange(len(examples))]  # noqa: E731
                           for _ in range(args.batch_size)] for _ in range(n)]
        u_pad, u_buck = utilisation(draw(200))
        t = step_times(model, draw(args.steps), device)
        print(f"| {name} {train_d} | {u_pad:.2f} | {u_buck:.2f} | {1000 * t['padded']:.1f} | "
              f"{1000 * t['bucketed']:.1f} | {t['padded'] / t['bucketed']:.2f}x |", flush=True)
    a, b = overhead_in_tokens(model, device)
    print(f"\nstep time = {1000 * a:.2f} ms + {1e6 * b:.2f} us x tokens: one more forward pass "
          f"costs about {a / b:.0f} tokens (star.BUCKET_OVERHEAD = {star.BUCKET_OVERHEAD})")


if __name__ == "__main__":
    main()
