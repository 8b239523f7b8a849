"""
STaR, the Self-Taught Reasoner (Zelikman, Wu, Mu, Goodman 2022, arXiv 2203.14465), Algorithm 1,
and Stream of Search (Gandhi et al. 2024, arXiv 2404.03683) at the end of the file:

  M0 <- train_start_model(P)                       # gold rationales, plain and hinted
  for n = 1..N:                                    # star_iteration
      kept <- keep_verified(D, sample(M(n-1), D))  # rationales whose answer checks out
      kept += keep_verified(failed, sample(M(n-1), failed, hint=True))   # rationalize
      M(n) <- finetune(M0, P + kept, iteration_steps(n)); evaluate_and_commit(M(n))
Run: python train.py --method star | sft (M0 alone) | sos   (--help for the ablation flags)
Departures: 1) a tiny GPT from scratch cannot be few-shot prompted, so M0 is fine-tuned on P;
2) P is taught plain and hinted ("H: 881") in every iteration, so the hint format is never
forgotten; 3) the learning rate warms up, then decays (cosine) to a tenth; 4) each iteration
restarts from M0 (--continue-training: from M(n-1), the ablation the paper argues against).
"""

import functools
import math
import os
import random
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import (all_gather, autocast, commit, committed, figure, generate, is_main,
                   load_checkpoint, lr_at, optimizer_step, paired_difference, rank_world,
                   read_jsonl, right_pad, save_checkpoint, seed_for, sequence_logprobs,
                   split_batch, wrap_ddp, write_atomic, write_jsonl)
from tasks import EOT, EOTH, PAD, SOT, TOKENIZER, decode, encode
from tasks.countdown import Countdown, CountdownTraces, search_trace, trace_stats

# Every setting of a run, per preset: train.py fills each flag left unset from here and refuses
# a flag that is not listed. "tiny" fits a 2-core CPU in minutes, "gpu" one H100.
_SHARED = dict(task="addition", n_train=300, step_growth=1.2, samples=1, temperature=0.0,
               rationalize=True, restart=True, direct_baseline=False, checkpoint=None,
               compile=False)
DEFAULTS = {
    "tiny": dict(_SHARED, n_unlabeled=600, n_test=300, steps=1000, batch_size=32, lr=2e-3,
                 sample_batch_size=300, iterations=3, star_steps=400),
    "small": dict(_SHARED, n_unlabeled=2000, n_test=500, steps=3000, batch_size=64, lr=1e-3,
                  sample_batch_size=500, iterations=6, star_steps=800),
    "gpu": dict(_SHARED, n_unlabeled=10000, n_test=2000, steps=3000, batch_size=256, lr=1e-3,
                sample_batch_size=2048, iterations=8, star_steps=1000)}
# --method sft is iteration 0 alone: M0 trained on P (or --checkpoint as it is), evaluated
SFT_FLAGS = ("task", "n_train", "n_test", "steps", "batch_size", "lr", "sample_batch_size",
             "checkpoint", "compile")
SFT_DEFAULTS = {preset: {k: d[k] for k in SFT_FLAGS} for preset, d in DEFAULTS.items()}

# -----------------------------------------------------------------------------
# Examples and batches

# What one forward and backward pass costs beyond its tokens, in tokens (kernel launches,
# autograd's bookkeeping): each extra bucket pays it again. tests/bench_training.py measures it.
BUCKET_OVERHEAD = 128


def make_example(task, p, completion, hint=False):
    """(prompt ids, completion ids + end-of-text) for one problem and one completion text."""
    return encode(task.prompt(p, hint=hint)), encode(completion) + [EOT]


def gold_examples(task, problems, with_hints=True):
    """P's worked examples; with their hinted copies, so the model learns the hint format."""
    return [make_example(task, p, task.gold_completion(p), hint=hint)
            for hint in ((False, True) if with_hints else (False,)) for p in problems]


def collate(examples, device):
    """Right-padded (B, T) ids and targets, -1 (ignored) on the prompt and the padding: the loss
    covers the whole completion (STaR's released code masked up to the last ':', a pitfall)."""
    seqs = [p + c for p, c in examples]
    idx = right_pad([s[:-1] for s in seqs], PAD, device)  # (B, T) inputs
    tgt = torch.full(idx.shape, -1, dtype=torch.long)  # (B, T) targets: idx shifted by one
    for b, (p, c) in enumerate(examples):
        tgt[b, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c, dtype=torch.long)
    return idx, tgt.to(device)


def summed_loss(forward, examples, device, n_targets):
    """The examples' summed token loss (one right-padded forward pass) over n_targets."""
    idx, tgt = collate(examples, device)
    with autocast(str(device)):
        logits = forward(idx)  # (B, T, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss in at least fp32
    return F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1),
                           ignore_index=-1, reduction="sum") / n_targets


def batch_loss(forward, batch, device):
    """Mean token loss of a batch (this process's share) in one padded forward pass: the textbook
    twin of batch_backward, which the tests compare it with."""
    share, n_targets = split_batch(batch, size=lambda ex: len(ex[1]))
    return summed_loss(forward, share, device, n_targets)


def length_buckets(lengths, overhead=None):
    """A batch's indices in buckets of similar length, little of a forward pass padding: the
    cheapest split (a bucket costs rows x its longest + `overhead`), by dynamic programming."""
    overhead = BUCKET_OVERHEAD if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    L = [lengths[i] for i in order]
    cost, cut = [0] + [math.inf] * len(L), [0] * (len(L) + 1)
    for j in range(1, len(L) + 1):  # cost[j]: the cheapest split of the j shortest
        for i in range(j):  # the last bucket holds the sorted items i..j-1
            c = cost[i] + (j - i) * L[j - 1] + overhead
            if c < cost[j]:
                cost[j], cut[j] = c, i
    buckets, j = [], len(L)
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def batch_backward(forward, batch, device):
    """batch_loss(...).backward() bucket by bucket (length_buckets): the same gradient, little
    padding; under torchrun gradients are averaged after the last bucket only. Returns the loss."""
    share, n_targets = split_batch(batch, size=lambda ex: len(ex[1]))
    buckets = length_buckets([len(p) + len(c) - 1 for p, c in share])
    total = 0.0
    for k, bucket in enumerate(buckets):
        last = k == len(buckets) - 1
        with nullcontext() if last or not hasattr(forward, "no_sync") else forward.no_sync():
            loss = summed_loss(forward, [share[i] for i in bucket], device, n_targets)
            loss.backward()
        total += loss.item()
    return total


def finetune(model, examples, steps, lr, batch_size, seed, desc="fine-tune", compile=False):
    """Supervised fine-tuning on (prompt, completion) examples, batch_size drawn per step and run
    in length buckets; returns the mean of the last 20 losses."""
    if not examples:
        raise ValueError("nothing to fine-tune on: the example set is empty")
    device = next(model.parameters()).device
    forward = wrap_ddp(torch.compile(model, dynamic=True) if compile else model)
    opt = model.configure_optimizer(lr)
    opt.zero_grad(set_to_none=True)
    rng, losses = random.Random(seed), []  # rng: the same batches in every process
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        losses.append(batch_backward(forward, batch, device))
        optimizer_step(opt, model.parameters(), clip=1.0,
                       lr=lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1)))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


# -----------------------------------------------------------------------------
# Sampling and evaluation

@functools.cache
def completion_cap(task, difficulty):
    """The sampler's length cap: 1.25 x the longest gold completion of 256 problems from a fixed
    seed, + 8; no test answer's length leaks into how long the model may write."""
    rng = random.Random(f"completion cap {task.name} {difficulty}")
    longest = max(len(task.gold_completion(task.sample(rng, difficulty))) for _ in range(256))
    return int((longest + 1) * 1.25) + 8


def sample(model, task, problems, hint=False, n=1, temperature=0.0, batch_size=256, seed=0,
           desc="sample"):
    """n completions per problem (end-of-text stripped) and the tokens generated (a tool's
    writes included). Sample j of problem i is drawn with seed_for(seed, i, j) in any batch;
    under torchrun each process samples its share, and every process gets all texts."""
    device = next(model.parameters()).device
    rank, world = rank_world()
    jobs = sorted((p.difficulty, i, j) for i, p in enumerate(problems) for j in range(n)
                  if i % world == rank)
    results, n_tokens = [], 0
    bar = tqdm(range(0, len(jobs), batch_size), desc=desc, leave=False, dynamic_ncols=True)
    for start in bar:
        chunk = jobs[start:start + batch_size]
        prompts = [encode(task.prompt(problems[i], hint=hint)) for _, i, _ in chunk]
        max_new = min(max(completion_cap(task, d) for d, _, _ in chunk),
                      model.config.block_size - max(map(len, prompts)))
        with autocast(str(device)):
            tokens, _, lengths = generate(model, prompts, max_new, stop_tokens=(EOT,),
                                          pad_id=PAD, temperature=temperature,
                                          banned_tokens=(SOT, EOTH, PAD),
                                          seeds=[seed_for(seed, i, j) for _, i, j in chunk],
                                          tool=task.tool and row_tool(task, problems, chunk))
        tokens, lengths = tokens.tolist(), lengths.tolist()
        n_tokens += sum(lengths)
        for (d, i, j), row, n_tok in zip(chunk, tokens, lengths):
            row = row[:min(n_tok, completion_cap(task, d))]  # its own cap, not its batch's
            results.append((i, j, decode(row[:-1] if row and row[-1] == EOT else row)))
    texts = [[None] * n for _ in problems]
    shares = all_gather((results, n_tokens))  # torchrun: every process's share; else just ours
    for share, _ in shares:
        for i, j, text in share:
            texts[i][j] = text
    return texts, sum(n for _, n in shares)


def row_tool(task, problems, chunk):
    """The task's tool (a calculator) as the sampler calls it: row r of the batch, its tokens."""
    def call(r, ids):
        return encode(task.tool(problems[chunk[r][1]], decode(ids)))
    call.trigger = encode(task.tool.trigger)[0]
    return call


def evaluate(model, task, problems, batch_size=256):
    """Greedy accuracy per difficulty, overall accuracy, and the completions."""
    texts, _ = sample(model, task, problems, temperature=0.0, batch_size=batch_size,
                      desc="evaluate")
    texts = [t[0] for t in texts]
    right = [task.check(p, t) for p, t in zip(problems, texts)]
    by_diff = {d: [ok for p, ok in zip(problems, right) if p.difficulty == d]
               for d in sorted({p.difficulty for p in problems})}
    acc = {d: sum(v) / len(v) for d, v in by_diff.items()}
    return acc, sum(right) / len(right), texts


# -----------------------------------------------------------------------------
# The STaR loop (Algorithm 1), from M0: the model trained on the worked examples P

def train_start_model(model, task, P, args, desc="SFT on P"):
    """Fine-tune a fresh model on P's gold rationales (with hinted copies); returns the loss."""
    return finetune(model, gold_examples(task, P), args.steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "sft"), desc=desc, compile=args.compile)


def iteration_steps(args, n):
    """Fine-tuning steps of iteration n (1-based): they grow each iteration, as in the paper."""
    return int(round(args.star_steps * args.step_growth ** (n - 1)))


def keep_verified(task, problems, texts):
    """(kept examples, indices of solved problems): only completions the verifier accepts."""
    kept, solved = [], set()
    for i, (p, ts) in enumerate(zip(problems, texts)):
        for t in ts:
            if task.check(p, t):
                kept.append(make_example(task, p, t))  # the prompt WITHOUT any hint
                solved.add(i)
    return kept, solved


def star_iteration(prev, start_path, task, P, D, args, n, device):
    """One iteration: generate, keep, rationalize, fine-tune. Returns (model, kept, stats).
    Seeds derive from the iteration alone, so a resumed run samples what it would have."""
    texts, n_tok = sample(prev, task, D, n=args.samples, temperature=args.temperature,
                          batch_size=args.sample_batch_size,
                          seed=seed_for(args.seed, "generate", n), desc=f"iter {n}: generate")
    kept, solved = keep_verified(task, D, texts)
    n_generated = len(kept)  # rationalize: the failures again, with the answer as a hint
    failed = [p for i, p in enumerate(D) if i not in solved]
    if args.rationalize and failed:
        hinted, n_tok_h = sample(prev, task, failed, hint=True, n=args.samples,
                                 temperature=args.temperature, batch_size=args.sample_batch_size,
                                 seed=seed_for(args.seed, "rationalize", n),
                                 desc=f"iter {n}: rationalize")
        kept += keep_verified(task, failed, hinted)[0]
        n_tok += n_tok_h
    model = load_checkpoint(start_path, device)[0] if args.restart else prev  # paper: restart
    steps = iteration_steps(args, n)
    loss = finetune(model, gold_examples(task, P) + kept, steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "fine-tune", n), desc=f"iter {n}: fine-tune",
                    compile=args.compile)
    stats = {"kept_generated": n_generated, "kept_rationalized": len(kept) - n_generated,
             "solved_D": len(solved) / len(D), "train_steps": steps, "train_loss": loss,
             "sampled_tokens": n_tok}
    return model, kept, stats


# -----------------------------------------------------------------------------
# The driver: commits every iteration and resumes an interrupted run where it stopped

def sample_lines(task, problems, texts, k=8):
    """A few test problems with the model's completions, for a person to read."""
    return [f"{task.prompt(p)}{t}\n[{'right' if task.check(p, t) else 'wrong'}; gold answer "
            f"{p.answer}]\n" for p, t in list(zip(problems, texts))[:k]]


def model_path(out, n):
    return os.path.join(out, f"model_iter{n}.pt")


def evaluate_and_commit(args, task, test, out, n, model, stats, t0, kept=None):
    """Iteration n's test accuracy; its checkpoint, kept data and samples, then its metrics row
    (the commit point). Only the newest iteration's model is kept (and M0)."""
    acc, overall, texts = evaluate(model, task, test, args.sample_batch_size)
    save_checkpoint(model_path(out, n), model, TOKENIZER, extra={"iteration": n})
    if kept is not None:
        write_jsonl(os.path.join(out, f"kept_iter{n}.jsonl"),
                    [{"prompt": decode(p), "completion": decode(c[:-1])} for p, c in kept])
    write_atomic(os.path.join(out, f"samples_iter{n}.txt"),
                 "\n".join(sample_lines(task, test, texts)))
    commit(out, {"kind": "iteration", "iteration": n, "accuracy": overall,
                 "accuracy_by_difficulty": {str(d): a for d, a in acc.items()},
                 # each test problem's rightness, for paired intervals (tests/paired.py)
                 "right": [int(task.check(p, t)) for p, t in zip(test, texts)], **stats}, t0)
    if n > 0 and os.path.exists(model_path(out, n - 1)) and is_main():
        os.remove(model_path(out, n - 1))
    tqdm.write(f"iteration {n}: accuracy {overall:.3f} | " +
               " ".join(f"{d}:{a:.2f}" for d, a in acc.items()) +
               (f" | kept {stats['kept_generated']}+{stats['kept_rationalized']}" if n else ""))


def run(args, task, P, D, test, out, device, new_model):
    """Iteration 0 trains M0 on P (all of --method sft); iterations 1.. are STaR. Started again
    on the same folder, the run continues after the last committed iteration."""
    finished = committed(out, "iteration", "iteration")
    start_path = os.path.join(out, "start.pt")
    if 0 in finished:
        prev = load_checkpoint(model_path(out, max(finished)), device)[0].eval()
        tqdm.write(f"resuming {out} after iteration {max(finished)}")
    else:
        t0, steps, loss = time.time(), 0, None  # a given --checkpoint is M0 as it is
        torch.manual_seed(args.seed)
        prev = new_model()
        if not args.checkpoint:
            steps, loss = args.steps, train_start_model(prev, task, P, args)
        save_checkpoint(start_path, prev, TOKENIZER, extra={"iteration": 0})
        evaluate_and_commit(args, task, test, out, 0, prev,
                            {"train_steps": steps, "train_loss": loss}, t0)
    for n in range(1, (args.iterations or 0) + 1):  # --method sft: none
        if n not in finished:
            t0 = time.time()
            prev, kept, stats = star_iteration(prev, start_path, task, P, D, args, n, device)
            evaluate_and_commit(args, task, test, out, n, prev, stats, t0, kept)
    if args.iterations and args.direct_baseline:
        run_direct_baseline(args, task, P, D, test, out, new_model)
    return prev


def run_direct_baseline(args, task, P, D, test, out, new_model):
    """The paper's baseline: the same network trained on question/answer pairs (P and D) with no
    rationales, from scratch, for as many steps as M0 plus every STaR iteration together."""
    if committed(out, "direct", "kind"):
        return
    t0 = time.time()
    steps = args.steps + sum(iteration_steps(args, n) for n in range(1, args.iterations + 1))
    torch.manual_seed(args.seed)
    model = new_model()
    direct = [make_example(task, p, task.completion([], p.answer)) for p in P + D]
    loss = finetune(model, direct, steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "direct"), desc="direct-answer baseline",
                    compile=args.compile)
    acc, overall, _ = evaluate(model, task, test, args.sample_batch_size)
    commit(out, {"kind": "direct", "accuracy": overall,
                 "accuracy_by_difficulty": {str(d): a for d, a in acc.items()},
                 "train_steps": steps, "train_loss": loss}, t0)
    tqdm.write(f"direct-answer baseline: accuracy {overall:.3f} | " +
               " ".join(f"{d}:{a:.2f}" for d, a in acc.items()))


# -----------------------------------------------------------------------------
# Report: plot and summary table

def summary_table(rows, difficulties):
    """Markdown: each iteration's (and the direct baseline's) accuracy per difficulty."""
    lines = ["| model | " + " | ".join(f"d={d}" for d in difficulties) +
             " | all | kept (gen+rat) | steps | wall s |", "|" + "---|" * (len(difficulties) + 5)]
    for r in rows:
        n = r.get("iteration")
        name = "direct answer" if r["kind"] != "iteration" else \
            "iteration 0 (P only)" if n == 0 else f"iteration {n}"
        acc = r["accuracy_by_difficulty"]
        kept = f"{r['kept_generated']}+{r['kept_rationalized']}" if "kept_generated" in r else "-"
        cells = " | ".join(f"{acc.get(str(d), float('nan')):.3f}" for d in difficulties)
        lines.append(f"| {name} | {cells} | {r['accuracy']:.3f} | {kept} | {r['train_steps']} | "
                     f"{r['wall_s']} |")
    return "\n".join(lines)


def plot(out, rows, difficulties, title, trained=()):
    """STaR's Figure 4: test accuracy per difficulty across iterations, with and without
    rationalization side by side when both folders exist (iteration 0 alone: a bar chart)."""
    from matplotlib import colormaps
    runs = [(title, rows)]
    twin = out[:-len("-norat")] if out.endswith("-norat") else out + "-norat"
    if os.path.exists(os.path.join(twin, "metrics.jsonl")):
        pair = [rows, read_jsonl(os.path.join(twin, "metrics.jsonl"))]
        runs = list(zip(("with rationalization", "without rationalization"),
                        pair if twin.endswith("-norat") else pair[::-1]))
    with figure(os.path.join(out, "accuracy.png"), ncols=len(runs),
                figsize=(5.5 * len(runs) + 1.5, 4), squeeze=False) as (fig, axes):
        for ax, (name, rs) in zip(axes[0], runs):
            its = [r for r in rs if r["kind"] == "iteration"]
            if len(its) == 1:
                acc = its[0]["accuracy_by_difficulty"]
                ax.bar([str(d) for d in difficulties], [acc.get(str(d), 0) for d in difficulties])
                ax.set_xlabel("difficulty")
            else:
                for i, d in enumerate(difficulties):
                    color = colormaps["viridis"](i / max(1, len(difficulties) - 1))
                    ax.plot([r["iteration"] for r in its],
                            [r["accuracy_by_difficulty"].get(str(d), float("nan")) for r in its],
                            marker="o", color=color,
                            label=f"{d}" if d in trained else f"{d} (never trained on)")
                ax.set_xlabel("STaR iteration")
                ax.set_xticks([r["iteration"] for r in its])
                if ax is axes[0][-1]:  # one legend, outside the data
                    ax.legend(title="difficulty", fontsize=8, loc="center left",
                              bbox_to_anchor=(1.02, 0.5))
            ax.set(ylim=(0, 1.02), ylabel="test accuracy (greedy)", title=name)
            ax.grid(alpha=0.3)


def report(args, rows):
    """The summary table (returned) and accuracy.png, from the run's metrics rows."""
    plot(args.out, rows, args.test_difficulty, f"{args.method} on {args.task}",
         args.train_difficulty)
    return summary_table(rows, args.test_difficulty)


# -----------------------------------------------------------------------------
# Stream of Search (Gandhi et al. 2024, arXiv 2404.03683): learning to search in text
#   paths <- finetune(P's optimal paths);  traces 0 <- finetune(P's search traces)
#   for n = 1..T: traces n <- sos_star_iteration(traces n-1)   # STaR on its own searches of D
#   test: sos_eval of each; one trace against the paths model's best_of_n at equal tokens
# Traces are tasks/countdown.search_trace's, failed searches kept; under --calculator judge the
# paths model's calculator still writes results only.

SOS_DEFAULTS = {"tiny": dict(
    task="countdown", train_difficulty="3", test_difficulty="3", n_train=2000, n_unlabeled=500,
    n_test=200, steps=1000, batch_size=32, lr=2e-3, sample_batch_size=250, iterations=2,
    star_steps=300, step_growth=1.0, samples=2, temperature=0.7, eval_samples=8,
    calculator="judge", checkpoint=None, compile=False)}
SOS_DEFAULTS["small"] = dict(SOS_DEFAULTS["tiny"], train_difficulty="3-4", test_difficulty="3-4",
                             n_train=5000, n_unlabeled=3000, n_test=500, steps=3000,
                             batch_size=64, lr=1e-3, sample_batch_size=500, star_steps=1000)
SOS_DEFAULTS["gpu"] = dict(SOS_DEFAULTS["small"], n_train=50000, n_unlabeled=20000,
                           n_test=2000, batch_size=256, sample_batch_size=2048, iterations=3,
                           eval_samples=64)


def sos_tasks(args):
    """The two views of countdown the two models learn: optimal paths, and search traces."""
    on = args.calculator != "off"
    return Countdown("result" if on else None), CountdownTraces(args.calculator if on else None)


def tool_tokens(task, p, text):
    """How many of a completion's tokens the task's tool wrote, replayed at each "=" (the tool
    reads only the text before it); a row cut by the length cap mid-write counts it whole."""
    return 0 if task.tool is None else sum(len(encode(task.tool(p, text[:i + 1])))
                                           for i, ch in enumerate(text) if ch == task.tool.trigger)


def sos_eval(model, task, test, args):
    """One model's greedy results: accuracy, per-problem rightness, tokens per problem (prompt,
    sampled, written by the tool) and, for traces, what the searches did."""
    acc, overall, texts = evaluate(model, task, test, args.sample_batch_size)
    right, n = [int(task.check(p, t)) for p, t in zip(test, texts)], len(test)
    row = {"accuracy": overall, "accuracy_by_difficulty": {str(d): a for d, a in acc.items()},
           "right": right, "prompt_tokens": sum(len(encode(task.prompt(p))) for p in test) / n,
           "completion_tokens": sum(len(encode(t)) + 1 for t in texts) / n,
           "written_tokens": sum(tool_tokens(task, p, t) for p, t in zip(test, texts)) / n}
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


@torch.no_grad()
def best_of_n(model, task, test, args):
    """The paths model's N samples per problem: exact best-of-k by its own mean token log-prob
    (close to an exact check: an unexpected calculator result lowers it) and pass@k, k = 1, 2, 4
    .. N, and tokens per sample (generated and scored)."""
    from vstar import best_of_k, pass_at_k  # lazy: vstar imports this module
    N = args.eval_samples
    texts, _ = sample(model, task, test, n=N, temperature=args.temperature,
                      batch_size=args.sample_batch_size, seed=seed_for(args.seed, "sos best-of"),
                      desc="paths: best-of-N samples")
    prompts = [encode(task.prompt(p)) for p in test for _ in range(N)]
    comps = [encode(t) + [EOT] for ts in texts for t in ts]
    score = []
    for i in range(0, len(prompts), 256):
        lp = sequence_logprobs(model, prompts[i:i + 256], comps[i:i + 256], PAD).float()
        score += (lp / torch.tensor([len(c) for c in comps[i:i + 256]])).tolist()
    ks = [2 ** i for i in range(int(math.log2(N)) + 1)]
    ok = [[task.check(p, t) for t in ts] for p, ts in zip(test, texts)]
    best = [[best_of_k(score[i * N:(i + 1) * N], o, k) for i, o in enumerate(ok)] for k in ks]
    passes = [[pass_at_k(N, sum(o), k) for o in ok] for k in ks]
    # a sample costs its prompt and completion once (cached), and once more to be scored
    per_sample = 2 * sum(len(p) + len(c) for p, c in zip(prompts, comps)) / len(prompts)
    return {"k": ks, "best": best, "pass": passes, "tokens_per_sample": per_sample}


def sos_star_iteration(args, traces, D, n, out, device):
    """STaR on the trace model's own searches: traces n-1 searches D, the traces whose found
    path is right are kept, and traces 0 is fine-tuned on them (with P's) for n's steps."""
    prev = load_checkpoint(os.path.join(out, f"traces_iter{n - 1}.pt"), device)[0].eval()
    texts, _ = sample(prev, traces, D, n=args.samples, temperature=args.temperature,
                      batch_size=args.sample_batch_size,
                      seed=seed_for(args.seed, "sos generate", n), desc=f"traces {n}: sample D")
    kept, solved = keep_verified(traces, D, texts)
    model = load_checkpoint(os.path.join(out, "traces_iter0.pt"), device)[0]
    return model, kept, {"kept": len(kept), "solved_D": len(solved) / len(D)}


def sos_evaluate_and_commit(args, task, test, out, n, name, model, stats, t0):
    """Model name's test results (the paths model's with best_of_n), checkpoint (traces) and
    samples, then its metrics row: the commit point a rerun resumes after."""
    row, texts = sos_eval(model, task, test, args)
    if n < 0:
        row["best_of_n"] = best_of_n(model, task, test, args)
    else:
        save_checkpoint(os.path.join(out, f"traces_iter{n}.pt"), model, TOKENIZER,
                        extra={"iteration": n})
    write_atomic(os.path.join(out, f"samples_{name.replace(' ', '')}.txt"),
                 "\n".join(sample_lines(task, test, texts, k=12)))
    commit(out, {"kind": "sos", "model": name, **row, **stats}, t0)
    tqdm.write(f"{name}: greedy accuracy {row['accuracy']:.3f}")


def run_sos(args, task, P, D, test, out, device, new_model):
    """The paths model (n = -1), the trace model (n = 0) and its STaR iterations, each trained,
    evaluated and committed; a rerun on the folder resumes after the last committed."""
    paths, traces = sos_tasks(args)
    finished = committed(out, "sos", "model")
    gold = [gold_examples(t, P, with_hints=False) for t in (paths, traces)]
    for n in [-1] + list(range(args.iterations + 1)):
        name, t = ("paths", paths) if n < 0 else (f"traces {n}", traces)
        if name in finished:
            continue
        t0, stats, examples = time.time(), {}, gold[n >= 0]
        if n <= 0:  # from scratch on P
            torch.manual_seed(args.seed)
            model, steps = new_model(), args.steps
        else:
            model, kept, stats = sos_star_iteration(args, traces, D, n, out, device)
            examples, steps = examples + kept, iteration_steps(args, n)
        loss = finetune(model, examples, steps, args.lr, args.batch_size,
                        seed=seed_for(args.seed, "sos", name), desc=f"{name}: fine-tune",
                        compile=args.compile)
        mean_len = sum(len(c) for _, c in examples) / len(examples)
        stats.update(train_steps=steps, train_loss=loss,
                     trained_tokens=round(steps * args.batch_size * mean_len))
        sos_evaluate_and_commit(args, t, test, out, n, name, model, stats, t0)


def sos_compare(rows):
    """The headline differences, (mean, 95% paired CI): the first and last trace models against
    the paths model greedy and at equal tokens (the largest k that costs no more) best-of-k and
    pass@k (the exact check, which "judge" gives the traces too); the last against the first."""
    by = {r["model"]: r for r in rows if r.get("kind") == "sos"}
    its = sorted((r for r in by.values() if r["model"].startswith("traces")),
                 key=lambda r: int(r["model"].split()[1]))
    if "paths" not in by or not its:
        return {}
    paths, bon = by["paths"], by["paths"]["best_of_n"]
    out = {}
    for m in dict.fromkeys([its[0]["model"], its[-1]["model"]]):
        t, cost = by[m], by[m]["prompt_tokens"] + by[m]["completion_tokens"]
        # best-of-k pays a scoring pass per sample; the exact check of pass@k costs nothing
        for key, name, per in (("best", "best-of-", bon["tokens_per_sample"]),
                               ("pass", "pass@", bon["tokens_per_sample"] / 2)):
            j = max([0] + [j for j, k in enumerate(bon["k"]) if k * per <= cost])
            out[f"{m} - paths {name}{bon['k'][j]} (equal tokens)"] = paired_difference(
                t["right"], bon[key][j])
        out[f"{m} - paths greedy"] = paired_difference(t["right"], paths["right"])
    if len(its) > 1:
        out[f"{its[-1]['model']} - {its[0]['model']}"] = paired_difference(
            its[-1]["right"], its[0]["right"])
    return out


def report_sos(args, rows):
    """The table of models, the headline differences, and sos.png."""
    lines = ["| model | greedy accuracy | tokens per problem (prompt + sampled + written) | "
             "backtracks | right after a dead end | lines with an error | false goal claims | "
             "solved beyond the symbolic searches | trained tokens | wall s |",
             "|---" * 10 + "|"]
    sos = [r for r in rows if r.get("kind") == "sos"]
    f = lambda r, k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    for r in sos:
        sampled = r["completion_tokens"] - r["written_tokens"]
        lines.append(f"| {r['model']} | {r['accuracy']:.3f} | {r['prompt_tokens']:.0f} + "
                     f"{sampled:.0f} + {r['written_tokens']:.0f} | {f(r, 'backtrack')} | "
                     f"{f(r, 'right_after_dead_end')} | {f(r, 'line_errors')} | "
                     f"{f(r, 'false_goal_claims')} | {f(r, 'beyond_symbolic')} | "
                     f"{r['trained_tokens']} | {r['wall_s']} |")
    lines += ["", "| comparison | difference (95% paired CI) |", "|---|---|"]
    lines += [f"| {k} | {m:+.3f} ({lo:+.3f} to {hi:+.3f}) |"
              for k, (m, (lo, hi)) in sos_compare(rows).items()]
    paths = next((r for r in sos if r["model"] == "paths"), None)
    if paths is not None:
        bon = paths["best_of_n"]
        with figure(os.path.join(args.out, "sos.png"), figsize=(6.5, 4)) as (fig, ax):
            x = [k * bon["tokens_per_sample"] for k in bon["k"]]
            ax.plot(x, [sum(b) / len(b) for b in bon["best"]], marker="o",
                    label="optimal paths: best-of-N (own log-prob)")
            ax.plot([v / 2 for v in x], [sum(b) / len(b) for b in bon["pass"]], ls="--",
                    marker=".", label="optimal paths: pass@N (exact check, no scoring pass)")
            for r in sos:
                if r["model"] != "paths":
                    ax.scatter([r["prompt_tokens"] + r["completion_tokens"]], [r["accuracy"]],
                               marker="*", s=120, label=f"one search trace: {r['model']}")
            ax.set_xscale("log", base=2)
            ax.set(xlabel="tokens processed per problem (prompt, sampled, written, scored)",
                   ylabel="held-out accuracy",
                   title=f"Stream of Search on countdown (calculator: {args.calculator})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return "\n".join(lines)
