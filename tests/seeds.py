"""
Does a headline hold in every seed? Each method's headline comparisons, one row per run folder
(the same command with --seed 0, 1, 2), each with its 95% paired bootstrap interval over that
run's test problems, and the count of seeds whose interval excludes 0 on the claimed side.

  python tests/seeds.py star out/star-seed0 out/star-seed1 out/star-seed2
  python tests/seeds.py vstar RUN0 RUN1 RUN2        (likewise search, quiet_star, sos, rl, score)

The comparisons: star, the last iteration against the step-matched control (M0 trained on P
alone as many more steps) and against M0; vstar, each verifier's
best-of-n against the generator's own log-prob at the same n (the same compute) and against
majority vote at equal total compute, the learned recheck against its own rule with the
generator's log-prob (rule x generator), DPO against the strongest free signal at each number
count, then the regime map pooled over the runs (the share of pass@1 -> pass@n each signal
closes); search, each learned-guided search against best-of-N and the weighted vote with the
same scorer at equal total compute; quiet_star, the thinking arm against the plain arm's own
thoughts at a fixed weight after the same steps, against the thinking arm without REINFORCE, the
plain arm and the base's own thoughts; sos, the trace models against the paths model and the
programs (sos.headline_differences); rl, the policy gradient against STaR and M0; score, each
arm's attempt 2 against its attempt 1, and SCoRe's against the others and the parallel pick.
Not collected by pytest (no test_ prefix).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rl  # noqa: E402
import score  # noqa: E402
import search  # noqa: E402
import sos  # noqa: E402
import vstar  # noqa: E402
from common import paired_difference, read_jsonl, with_ci  # noqa: E402


def diff(a, b):
    """(mean of a - b, 95% paired interval) over the same problems."""
    return paired_difference(a, b)


def star_rows(rows):
    its = sorted((r for r in rows if r.get("kind") == "iteration"), key=lambda r: r["iteration"])
    last, out = its[-1], {}
    control = next((r for r in rows if r.get("kind") == "control"), None)
    if control:  # what the kept rationales add beyond as many more steps on P alone
        out[f"STaR iteration {last['iteration']} - step-matched control"] = diff(
            last["right"], control["right"])
    out[f"STaR iteration {last['iteration']} - M0"] = diff(last["right"], its[0]["right"])
    return out


def vstar_rows(rows):
    ev = next(r for r in rows if r.get("kind") == "eval")
    ks, J, out = ev["k"], len(ev["k"]) - 1, {}
    for key in ev["by_problem"]:
        if not key.startswith("best-of-k ") or key in ("best-of-k length", "best-of-k random"):
            continue
        name = key[len("best-of-k "):]
        if name != "generator":
            out[f"{name} - generator log-prob, k={ks[J]}"] = diff(
                ev["by_problem"][key][J], ev["by_problem"]["best-of-k generator"][J])
        if name == "learned recheck" and "best-of-k rule x generator" in ev["by_problem"]:
            # what the recheck's learned arithmetic adds to its rule (same samples, same k)
            out[f"{name} - rule x generator, k={ks[J]}"] = diff(
                ev["by_problem"][key][J], ev["by_problem"]["best-of-k rule x generator"][J])
        j = max(i for i, k in enumerate(ks) if i == 0 or vstar.cost_of(ev, key, k)
                <= vstar.cost_of(ev, "m", ks[J]) + 1e-9)
        out[f"{name} k={ks[j]} - majority k={ks[J]} (equal compute)"] = diff(
            ev["by_problem"][key][j], ev["by_problem"]["majority@k"][J])
    for d, (_, cell) in vstar.against_free(ev, "best-of-k dpo").items() \
            if "difficulty" in ev else ():  # (which signal it is: the run's summary.md)
        out[f"dpo - the strongest free signal, numbers {d}"] = cell
    return out


def search_rows(rows):
    return search.headline_differences(rows)


def quiet_star_rows(rows):
    last = max((r for r in rows if r.get("kind") == "eval"), key=lambda r: r["step"])
    out = {}
    for name, key in (("thinking - plain arm's own thoughts, w=1", "vs_plain_w1"),
                      ("thinking - no REINFORCE", "vs_no_reinforce"),
                      ("thinking - plain arm", "change"), ("thinking - the base's thoughts, w=1",
                                                          "vs_fixed")):
        if key in last:
            c = last[key]
            out[f"accuracy, {name}"] = (c["acc"], tuple(c["acc_ci"]))
    return out


def sos_rows(rows):
    return sos.headline_differences(rows)


def rl_rows(rows):
    return rl.headline_differences(rows)


def score_rows(rows):
    return score.headline_differences(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("method",
                   choices=["star", "vstar", "search", "quiet_star", "sos", "rl", "score"])
    p.add_argument("runs", nargs="+", help="run folders, one per seed")
    args = p.parse_args()
    per_run = []
    for run in args.runs:
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.exists(path):
            p.error(f"argument runs: {run!r} has no metrics.jsonl")
        per_run.append(globals()[f"{args.method}_rows"](read_jsonl(path)))
    print("| comparison | " + " | ".join(os.path.basename(r.rstrip("/")) for r in args.runs) +
          " | seeds above 0 | seeds below 0 |")
    print("|---" * (len(args.runs) + 3) + "|")
    for name in per_run[0]:
        cells = [r.get(name) for r in per_run]
        # above (below) 0 as printed: an interval bound of +0.000 to three places is not
        up = sum(c is not None and round(c[1][0], 3) > 0 for c in cells)
        down = sum(c is not None and round(c[1][1], 3) < 0 for c in cells)
        text = ["-" if c is None else with_ci(*c) for c in cells]
        print(f"| {name} | " + " | ".join(text) + f" | {up} | {down} |")
    if args.method == "vstar":  # the regime map, pooled over the runs
        evs = [next(r for r in read_jsonl(os.path.join(run, "metrics.jsonl"))
                    if r.get("kind") == "eval") for run in args.runs]
        if all("difficulty" in ev for ev in evs):
            print("\n" + "\n".join(vstar.regime_map(evs)))


if __name__ == "__main__":
    main()
