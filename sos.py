"""
Stream of Search (Gandhi et al. 2024, arXiv 2404.03683): learning to search by training on the
text of searches. Not a new kind of training but a new kind of rationale: tasks/countdown.py
writes the trace of a symbolic search (the steps tried, the numbers left, dead ends, the goal,
backing up) as text; the same fine-tuning as STaR's trains on it, and the same STaR loop improves
it on the model's own traces.

    paths    <- finetune(fresh, P's optimal paths)                 paths_stage
    traces 0 <- finetune(fresh, P's search traces, failed ones too) traces_stage(0)
    for n = 1..T:                                                  traces_stage(n)
        kept <- keep_verified(D, sample(traces n-1, D))             # STaR on its own searches
        traces n <- finetune(traces 0, P's traces + kept)
    test: each model greedily; one trace against the paths model's best-of-k and pass@k at
      equal tokens (integer k), a uniformly random depth-first search and the teacher (the
      symbolic search the traces come from) at the trace model's tokens   symbolic_rows

Run: python train.py --method sos          (--calculator off | result | judge)
Departures: 1) countdown with 3 numbers by default, not the paper's 4 (a 2-core CPU); 2) under
--calculator judge the program writes each step's result and the numbers left, marks dead leaves
and writes the found path at the goal; the paths model's calculator writes results only;
3) STaR keeps traces whose found path is right, failed searches are never kept.
"""

import math
import os
import time

import torch
from tqdm import tqdm

import vstar
from common import (SWITCH, best_of_k, commit, committed, figure, flag, load_checkpoint,
                    non_negative, paired_difference, pass_at_k, positive, presets,
                    save_checkpoint, seed_for, setting, with_ci, write_atomic)
from star import (finetune, gold_examples, iteration_steps, keep_verified, sample, sample_lines,
                  held_out_results)
from tasks import EOT, TOKENIZER, encode
from tasks.countdown import CountdownTraces, search_trace, trace_stats

# Every flag sos takes beyond train.py's own, with its value per preset (tiny, small, gpu).
FLAGS = [
    setting("--task", "countdown"),
    setting("--train-difficulty", ("3", "3-4", "3-4")),  # numbers per problem
    setting("--test-difficulty", ("3", "3-4", "3-4")),
    # data
    flag("--n-train", positive(int), (2000, 5000, 50000),
         "size of P, problems with an optimal path and a search trace"),
    flag("--n-unlabeled", positive(int), (400, 3000, 20000),
         "size of D, problems with answers only, searched by the model in STaR"),
    flag("--n-test", positive(int), (200, 500, 2000), "held-out test problems"),
    # training: both models from scratch on P, then STaR on the trace model
    flag("--checkpoint", str, None, "start both models from this model instead of a fresh one"),
    flag("--steps", positive(int), (1000, 3000, 3000),
         "fine-tuning steps of the paths model and of traces 0 on P"),
    flag("--batch-size", positive(int), (16, 64, 256), "examples per training step"),
    flag("--lr", positive(float), (2e-3, 1e-3, 1e-3), "peak learning rate"),
    flag("--compile", SWITCH, False, "torch.compile the training forward"),
    flag("--iterations", non_negative(int), (2, 2, 3), "STaR iterations after traces 0"),
    flag("--star-steps", positive(int), (200, 1000, 1000),
         "fine-tuning steps of the first STaR iteration on the traces"),
    flag("--step-growth", positive(float), 1.0, "STaR's steps multiply by this every iteration"),
    # sampling
    flag("--sample-batch-size", positive(int), (250, 500, 2048), "prompts per sampling batch"),
    flag("--samples", positive(int), 2, "traces sampled per problem of D in each STaR iteration"),
    flag("--temperature", float, 0.7,
         "sampling temperature of STaR's traces and of the paths model's best-of-N"),
    flag("--eval-samples", positive(int), (8, 8, 64),
         "the paths model's samples per test problem for best-of-k and pass@k (a power of 2)"),
    flag("--calculator", ["off", "result", "judge"], "judge",
         "the program writes each a op b= result (result), also a trace step's numbers left "
         "and a leaf's verdict (judge), or nothing (off)"),
]
DEFAULTS = presets(FLAGS)
TASK_CHOICES = ("countdown",)  # train.py refuses another --task


def paths_and_traces(args, task):
    """The two views of countdown the two models learn, drawn as `task` is: optimal paths, and
    search traces."""
    on = args.calculator != "off"
    return (task.with_calculator("result" if on else "off"),
            CountdownTraces(args.calculator if on else None, **task.setting))


def completion_task(args, task):
    """The task whose completions are the longest this method writes (train.py sizes the model's
    block by it): the search traces."""
    return paths_and_traces(args, task)[1]


# -----------------------------------------------------------------------------
# Measuring a model: greedy results, and the paths model's best-of-k at equal tokens

def greedy_results(model, task, test, args):
    """One model's greedy results: accuracy, per-problem rightness, tokens per problem (prompt,
    sampled, written by the tool) and, for traces, what the searches did. Returns (row, texts)."""
    # 1) greedy accuracy, and the tokens per problem: prompt, sampled, written by the tool (the
    # sampler's count, held_out_results')
    row, texts = held_out_results(model, task, test, args)
    right, n = row["right"], len(test)
    row.setdefault("written_tokens", 0.0)
    row.update({"prompt_tokens": sum(len(encode(task.prompt(p))) for p in test) / n,
                "completion_tokens": sum(len(encode(t)) + 1 for t in texts) / n})
    # 2) what the searches did (traces), or the arithmetic slips (paths)
    if isinstance(task, CountdownTraces):
        st = [trace_stats(p, t) for p, t in zip(test, texts)]
        symbolic = [any(search_trace(*p.data, strategy=s, budget=task.budget)[1]
                        for s in task.mix) for p in test]
        solved = [i for i in range(n) if right[i]]
        row.update({
            "backtrack": sum(s["backtracks"] for s in st) / n,
            "right_after_dead_end": sum(s["backtracks"] and r for s, r in zip(st, right)) / n,
            "line_errors": sum(s["slips"] for s in st) / max(1, sum(s["lines"] for s in st)),
            "false_goal_claims": sum(s["false_claims"] for s in st) /
            max(1, sum(s["claims"] for s in st)),
            "beyond_symbolic": sum(not symbolic[i] for i in solved) / max(1, len(solved))})
    else:  # a path's arithmetic slips: claimed results the recomputation disagrees with
        steps = [task.recheck(t) or [] for t in texts]
        row["line_errors"] = sum(c != v for s in steps for _, c, v in s) / \
            max(1, sum(map(len, steps)))
    return row, texts


def best_of_n(model, task, test, args):
    """The paths model's N samples per problem: exact best-of-k by its own mean token log-prob
    (close to an exact check: an unexpected calculator result lowers it) and pass@k, k = 1, 2, 4
    .. N, and tokens per sample (generated and scored). Returns the best_of_n entry of its row."""
    N = args.eval_samples
    texts, sampled = sample(model, task, test, n=N, temperature=args.temperature,
                      batch_size=args.sample_batch_size, seed=seed_for(args.seed, "sos best-of"),
                      desc="paths: best-of-N samples")
    prompts = [encode(task.prompt(p)) for p in test for _ in range(N)]
    comps = [encode(t) + [EOT] for ts in texts for t in ts]
    score = vstar.logprob_scores(model, prompts, comps, mean=True)
    ks = [2 ** i for i in range(int(math.log2(N)) + 1)]
    ok = [[task.check(p, t) for t in ts] for p, ts in zip(test, texts)]
    best = [[best_of_k(score[i * N:(i + 1) * N], o, k) for i, o in enumerate(ok)]
            for k in ks]
    passes = [[pass_at_k(N, sum(o), k) for o in ok] for k in ks]
    # k samples cost the prompt once (shared cache rows) and k completions; the scoring pass
    # reads each sample's prompt and completion again (tokens: "prompt" per problem, the others
    # per sample)
    tokens = {"prompt": sampled.prompt / len(test), "sampled": sampled.sampled / len(comps),
              "scored": sum(len(p) + len(c) for p, c in zip(prompts, comps)) / len(comps)}
    return {"k": ks, "best": best, "pass": passes, "tokens": tokens}


def pass_within(bon, tokens):
    """The paths model's pass@k at the largest integer k (1 to N) whose tokens per problem are at
    most `tokens`, each problem's from its share right of the N samples (pass@1): (k, rights)."""
    N = bon["k"][-1]
    k = max([1] + [k for k in range(1, N + 1) if paths_cost(bon, "pass", k) <= tokens])
    return k, [pass_at_k(N, round(p1 * N), k) for p1 in bon["pass"][0]]


def best_within(bon, tokens):
    """The index into bon["k"] of the largest k whose best-of-k costs at most `tokens` per
    problem (0, k = 1, when none does)."""
    return max([0] + [j for j, k in enumerate(bon["k"]) if paths_cost(bon, "best", k) <= tokens])


def paths_cost(bon, key, k):
    """Tokens per problem of the paths model's best-of-k (key "best": with its scoring pass) or
    pass@k (key "pass": the exact check reads nothing)."""
    t = bon["tokens"]
    return t["prompt"] + k * (t["sampled"] + (t["scored"] if key == "best" else 0.0))


# -----------------------------------------------------------------------------
# The models: each trained, measured, saved and committed as one stage named by its model

def fit(model, examples, steps, name, args):
    """finetune on examples for steps; the row's training stats."""
    loss = finetune(model, examples, steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "sos", name), desc=f"{name}: fine-tune",
                    compile=args.compile)
    mean_len = sum(len(c) for _, c in examples) / len(examples)
    return {"train_steps": steps, "train_loss": loss,
            "trained_tokens": round(steps * args.batch_size * mean_len)}


def save_samples(out, name, task, test, texts):
    """A few of a model's test completions, for a person to read: samples_<name>.txt."""
    write_atomic(os.path.join(out, f"samples_{name.replace(' ', '')}.txt"),
                 "\n".join(sample_lines(task, test, texts, k=12)))


def paths_stage(args, paths, P, test, out, new_model):
    """The stage of the baseline: a fresh model fine-tuned on P's optimal paths, tested greedily
    and by best-of-N with its own log-prob, its samples saved, its row committed."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    model = new_model()
    stats = fit(model, gold_examples(paths, P, with_hints=False), args.steps, "paths", args)
    row, texts = greedy_results(model, paths, test, args)
    row["best_of_n"] = best_of_n(model, paths, test, args)
    save_samples(out, "paths", paths, test, texts)
    commit(out, t0, {"kind": "sos", "model": "paths", **row, **stats})
    tqdm.write(f"paths: greedy accuracy {row['accuracy']:.3f}")


def traces_path(out, n):
    return os.path.join(out, f"traces_iter{n}.pt")


def traces_stage(args, traces, P, D, test, out, device, new_model, n):
    """The stage of trace model n: a fresh model on P's search traces (n = 0), or STaR's
    iteration n: traces n-1 searches D, the traces whose found path is right are kept, and
    traces 0 is fine-tuned on them with P's for iteration n's steps. Tested greedily, saved with
    its samples, its row committed."""
    t0, name, stats = time.time(), f"traces {n}", {}
    examples = gold_examples(traces, P, with_hints=False)
    # 1) the starting model and the examples: P's traces, and from n = 1 its own kept searches
    if n == 0:
        torch.manual_seed(args.seed)
        model, steps = new_model(), args.steps
    else:
        prev = load_checkpoint(traces_path(out, n - 1), device)[0].eval()
        texts, _ = sample(prev, traces, D, n=args.samples, temperature=args.temperature,
                          batch_size=args.sample_batch_size,
                          seed=seed_for(args.seed, "sos generate", n), desc=f"{name}: sample D")
        kept, solved = keep_verified(traces, D, texts)
        stats = {"kept": len(kept), "solved_D": len(solved) / len(D)}
        model = load_checkpoint(traces_path(out, 0), device)[0]
        examples, steps = examples + kept, iteration_steps(args, n)
    # 2) fine-tune, test, save, commit
    stats.update(fit(model, examples, steps, name, args))
    row, texts = greedy_results(model, traces, test, args)
    save_checkpoint(traces_path(out, n), model, TOKENIZER, extra={"iteration": n})
    save_samples(out, name, traces, test, texts)
    commit(out, t0, {"kind": "sos", "model": name, **row, **stats})
    tqdm.write(f"{name}: greedy accuracy {row['accuracy']:.3f}")


def run(args, task, P, D, test, out, device, new_model):
    """The paths model, the trace model and its STaR iterations, each a stage, then the symbolic
    searches at their tokens; a rerun on the folder resumes after the last committed."""
    paths, traces = paths_and_traces(args, task)
    finished = committed(out, "model", kind="sos")
    if "paths" not in finished:
        paths_stage(args, paths, P, test, out, new_model)
    for n in range(args.iterations + 1):
        if f"traces {n}" not in finished:
            traces_stage(args, traces, P, D, test, out, device, new_model, n)
    if not committed(out, "kind", kind="symbolic"):
        t0 = time.time()
        commit(out, t0, *symbolic_rows(args, traces, test))


def symbolic_rows(args, traces, test):
    """What a program gets for tokens: the teacher (the symbolic search P's traces come from,
    the same line budget) and a depth-first search trying legal moves in a uniformly random
    order (no line budget; problem i's order from seed (run, i)). Both write the text a trace
    has under the judge, so a token counts alike. A row per search: each problem's tokens to
    its end (prompt, trace, found path and answer or FAILED, end-of-text), whether it found."""
    searches = {"teacher": [search_trace(*p.data, strategy=traces.strategy(p),
                                         budget=traces.budget) for p in test],
                "random DFS": [search_trace(*p.data, strategy="dfs-random", budget=10 ** 6,
                                            seed=seed_for(args.seed, "random dfs", i))
                               for i, p in enumerate(test)]}
    return [{"kind": "symbolic", "search": name,
             "tokens": [len(encode(traces.prompt(p) + text)) + 1 for p, (text, _) in
                        zip(test, found)], "found": [int(ok) for _, ok in found]}
            for name, found in searches.items()]


def solved_within(row, tokens):
    """A symbolic search stopped after C tokens on every problem, C the largest at which its
    mean tokens per problem (a stopped search spends C) are at most `tokens`, the trace models'
    measure: (C, each problem solved by then)."""
    mean_at = lambda C: sum(min(t, C) for t in row["tokens"]) / len(row["tokens"])  # noqa: E731
    C = max([0] + [t for t in row["tokens"] if mean_at(t) <= tokens])
    return C, [int(f and t <= C) for t, f in zip(row["tokens"], row["found"])]


# -----------------------------------------------------------------------------
# Report: the headline differences, the table and sos.png

def headline_differences(rows):
    """The headline differences, {name: (mean, 95% paired CI)}: the first and last trace models
    against the paths model greedy and at equal tokens (the largest integer k that costs no
    more) best-of-k and pass@k (sampling until the exact check, which "judge" gives the traces
    too, accepts one), against a random depth-first search and the teacher at their tokens; the
    last against the first."""
    by = {r["model"]: r for r in rows if r.get("kind") == "sos"}
    its = sorted((r for r in by.values() if r["model"].startswith("traces")),
                 key=lambda r: int(r["model"].split()[1]))
    if "paths" not in by or not its:
        return {}
    # the first and the last trace model against the paths model, then against each other
    paths, bon = by["paths"], by["paths"]["best_of_n"]
    out = {}
    symbolic = {r["search"]: r for r in rows if r.get("kind") == "symbolic"}
    for m in dict.fromkeys([its[0]["model"], its[-1]["model"]]):
        t, cost = by[m], by[m]["prompt_tokens"] + by[m]["completion_tokens"]
        j = best_within(bon, cost)
        out[f"{m} - paths best-of-k (equal tokens)"] = paired_difference(
            t["right"], bon["best"][j])
        k, right = pass_within(bon, cost)
        out[f"{m} - paths pass@k (equal tokens)"] = paired_difference(t["right"], right)
        for name in ("random DFS", "teacher"):
            if name in symbolic:
                out[f"{m} - {name} (equal tokens)"] = paired_difference(
                    t["right"], solved_within(symbolic[name], cost)[1])
        out[f"{m} - paths greedy"] = paired_difference(t["right"], paths["right"])
    if len(its) > 1:
        out[f"{its[-1]['model']} - {its[0]['model']}"] = paired_difference(
            its[-1]["right"], its[0]["right"])
    return out


def plot(path, rows, calculator):
    """sos.png: accuracy against tokens per problem, the paths model's best-of-N and pass@N
    curves, the symbolic searches' (solved within x tokens), one point per trace model."""
    sos = [r for r in rows if r.get("kind") == "sos"]
    bon = next(r for r in sos if r["model"] == "paths")["best_of_n"]
    with figure(path, figsize=(6.5, 4)) as (fig, ax):
        # the programs' and the paths model's curves against tokens, a point per trace model
        for r in (r for r in rows if r.get("kind") == "symbolic"):  # stopped at C tokens
            at = [(sum(min(t, C) for t in r["tokens"]) / len(r["tokens"]),
                   sum(f and t <= C for t, f in zip(r["tokens"], r["found"])) / len(r["tokens"]))
                  for C in sorted(set(r["tokens"]))]
            ax.plot(*zip(*at), ls=":", color="black" if r["search"] == "teacher" else "gray",
                    label=f"{r['search']} (a program, under the judge), stopped at a budget")
        ax.plot([paths_cost(bon, "best", k) for k in bon["k"]],
                [sum(b) / len(b) for b in bon["best"]], marker="o", color="C0",
                label="optimal paths: best-of-N (own log-prob)")
        ax.plot([paths_cost(bon, "pass", k) for k in bon["k"]],
                [sum(b) / len(b) for b in bon["pass"]], ls="--", color="C0",
                marker=".", label="optimal paths: pass@N (exact check, no scoring pass)")
        for j, r in enumerate(r for r in sos if r["model"] != "paths"):
            ax.scatter([r["prompt_tokens"] + r["completion_tokens"]], [r["accuracy"]],
                       marker="*", s=120, color=f"C{j + 1}",
                       label=f"one search trace: {r['model']}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="tokens processed per problem (prompt, sampled, written, scored)",
               ylabel="held-out accuracy",
               title=f"Stream of Search on countdown (calculator: {calculator})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def report(args, rows):
    """The table of models and the headline differences (returned), and sos.png."""
    lines = ["| model | greedy accuracy | tokens per problem (prompt + sampled + written) | "
             "backtracks | right after a dead end | lines with an error | false goal claims | "
             "solved beyond the symbolic searches | trained tokens | wall s |",
             "|---" * 10 + "|"]
    # 1) a row per model
    sos = [r for r in rows if r.get("kind") == "sos"]
    f = lambda r, k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    for r in sos:
        sampled = r["completion_tokens"] - r["written_tokens"]
        lines.append(f"| {r['model']} | {r['accuracy']:.3f} | {r['prompt_tokens']:.0f} + "
                     f"{sampled:.0f} + {r['written_tokens']:.0f} | {f(r, 'backtrack')} | "
                     f"{f(r, 'right_after_dead_end')} | {f(r, 'line_errors')} | "
                     f"{f(r, 'false_goal_claims')} | {f(r, 'beyond_symbolic')} | "
                     f"{r['trained_tokens']} | {r['wall_s']} |")
    # 2) the symbolic searches, then the headline differences, and the picture
    for r in (r for r in rows if r.get("kind") == "symbolic"):
        n, last = len(r["found"]), sos[-1]
        lines.append(f"| {r['search']} (a program, to its end) | {sum(r['found']) / n:.3f} | "
                     f"{sum(r['tokens']) / n:.0f} | - | - | - | - | - | - | - |")
        T = last["prompt_tokens"] + last["completion_tokens"]
        C, right = solved_within(r, T)
        lines.append(f"| {r['search']}, stopped at {C} tokens ({last['model']}'s mean) | "
                     f"{sum(right) / n:.3f} | {T:.0f} | - | - | - | - | - | - | - |")
    lines += ["", "| comparison | difference (95% paired CI) |", "|---|---|"]
    lines += [f"| {k} | {with_ci(*d)} |" for k, d in headline_differences(rows).items()]
    bon = next((r["best_of_n"] for r in sos if r["model"] == "paths"), None)
    for r in (r for r in sos if r["model"] != "paths" and bon):  # the k of "equal tokens"
        cost = r["prompt_tokens"] + r["completion_tokens"]
        k = bon["k"][best_within(bon, cost)]
        lines.append(f"\nAt {r['model']}'s {cost:.0f} tokens: the paths model's best-of-{k}, "
                     f"pass@{pass_within(bon, cost)[0]}.")
    if any(r["model"] == "paths" for r in sos):
        plot(os.path.join(args.out, "sos.png"), rows, args.calculator)
    return "\n".join(lines)
