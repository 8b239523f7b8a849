"""
Is the difference between two runs real? The paired 95% bootstrap interval of the difference in
test accuracy between the last iteration of two STaR (or sft) runs with the same seed, hence the
same test problems, from each iteration row's per-problem rightness ("right" in metrics.jsonl).

  python tests/paired.py out/star-addition out/star-addition-norat
  python tests/paired.py RUN_A RUN_B --iteration 2      # compare iteration 2 of each
  python tests/paired.py SOS_A SOS_B --models "traces 0" paths   # two models of sos runs
  python tests/paired.py RL_A RL_B --models rl rl       # rl arms after their last round

Prints each run's accuracy, the difference A - B and its interval (common.bootstrap_ci over
the per-problem differences). A difference whose interval holds 0 is no difference. Not
collected by pytest (no test_ prefix).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import bootstrap_ci, read_jsonl  # noqa: E402


def model_row(run, name):
    """A sos run's model, or an rl run's arm (rl, star, m0) after its last round."""
    rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
    for r in rows:
        if r.get("kind") == "sos" and r["model"] == name:
            return dict(r, iteration=name)
    arm = [r for r in rows if r.get("kind") == "round" and r["arm"] == name]
    if arm:
        r = max(arm, key=lambda r: r["round"])
        return dict(r, iteration=f"{name}, round {r['round']}")
    sys.exit(f"paired.py: error: {run!r} has no sos model or rl arm {name!r}")


def right_of(run, iteration):
    rows = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl"))
            if r.get("kind") == "iteration" and "right" in r]
    if not rows:
        sys.exit(f"paired.py: error: {run!r} has no iteration row with per-problem results")
    if iteration is None:
        return rows[-1]
    for r in rows:
        if r["iteration"] == iteration:
            return r
    sys.exit(f"paired.py: error: {run!r} has no iteration {iteration}; it has "
             f"{[r['iteration'] for r in rows]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--iteration", type=int, default=None, help="default: each run's last")
    ap.add_argument("--models", nargs=2, metavar=("A", "B"),
                    help="--method sos (rl) runs: the model (arm) of each to compare")
    args = ap.parse_args()
    if args.models:
        a, b = model_row(args.run_a, args.models[0]), model_row(args.run_b, args.models[1])
    else:
        a, b = right_of(args.run_a, args.iteration), right_of(args.run_b, args.iteration)
    if len(a["right"]) != len(b["right"]):
        sys.exit("paired.py: error: the runs have different test sets "
                 f"({len(a['right'])} and {len(b['right'])} problems)")
    diff = [x - y for x, y in zip(a["right"], b["right"])]
    lo, hi = bootstrap_ci(diff)
    print(f"A {args.run_a} ({a['iteration']}): {a['accuracy']:.3f}")
    print(f"B {args.run_b} ({b['iteration']}): {b['accuracy']:.3f}")
    print(f"A - B: {sum(diff) / len(diff):+.3f} (paired 95% interval {lo:+.3f} to {hi:+.3f}, "
          f"{len(diff)} problems)")


if __name__ == "__main__":
    main()
