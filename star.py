"""
STaR, the Self-Taught Reasoner: a model learns to reason by fine-tuning on its own rationales.

Follows Zelikman, Wu, Mu, Goodman 2022, "STaR: Bootstrapping Reasoning With Reasoning"
(arXiv 2203.14465), Algorithm 1. Each iteration n:
  1. sample a rationale and answer for every problem of D with M(n-1);
  2. keep those the outcome verifier accepts;
  3. rationalize: for the failures, sample again with the answer given as a hint; keep the
     verified ones and store them WITHOUT the hint;
  4. M(n) = fine-tune the starting model on what was kept (the paper restarts each iteration),
     with more steps each iteration;
  5. evaluate on held-out problems.

Run: python train.py --method star           (python train.py --help for the ablation flags)
The supervised stage alone (the model trained on worked examples P): python train.py --method sft

Deliberate departures from the paper:
1. The model is a tiny GPT trained from scratch, so it cannot be few-shot prompted (the paper
   notes GPT-2 could not bootstrap from few-shot prompts either). The starting model M0 is a
   model fine-tuned on a small set P of problems with gold rationales.
2. M0 must know what a hint looks like to rationalize, so P is taught in both forms: the plain
   prompt, and the prompt with its answer as a hint ("H: 881"). Every iteration's fine-tuning
   set is P (both forms) plus what was kept, so no iteration forgets the hint format.
3. Learning rate: linear warm-up then cosine decay to a tenth (the paper: 100 warm-up steps,
   then constant); a from-scratch model converges better with the decay.
4. Fine-tuning restarts from M0, not from a pretrained model, since M0 is our "pretrained" model.
   --continue-training continues from M(n-1) instead (the ablation the paper argues against).
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

from model import (all_gather, append_jsonl, autocast, figure, generate, is_main,
                   load_checkpoint, lr_at, rank_world, read_jsonl, right_pad, save_checkpoint,
                   seed_for, split_batch, wrap_ddp, write_atomic, write_jsonl)
from tasks import EOT, EOTH, PAD, SOT, TOKENIZER, decode, encode

# Every setting of a run, per preset: train.py fills each flag left unset from here and refuses
# a flag that is not listed. "tiny" fits a 2-core CPU in minutes, "gpu" one H100. The tiny
# steps come from a sweep (README, STaR): fewer M0 steps or fewer per iteration lost accuracy,
# smaller batches too, and a 4th iteration added nothing beyond the interval.
_SHARED = dict(task="addition", n_train=300, step_growth=1.2, samples=1, temperature=0.0,
               rationalize=True, restart=True, direct_baseline=False, checkpoint=None,
               compile=False)
DEFAULTS = {
    "tiny": dict(_SHARED, n_unlabeled=600, n_test=300, steps=1000, batch_size=32, lr=2e-3,
                 sample_batch_size=300, iterations=3, star_steps=400),
    "small": dict(_SHARED, n_unlabeled=2000, n_test=500, steps=3000, batch_size=64, lr=1e-3,
                  sample_batch_size=500, iterations=6, star_steps=800),
    "gpu": dict(_SHARED, n_unlabeled=10000, n_test=2000, steps=3000, batch_size=256, lr=1e-3,
                sample_batch_size=2048, iterations=8, star_steps=1000),
}
# --method sft is iteration 0 alone: M0 trained on P (or --checkpoint as it is), evaluated
SFT_FLAGS = ("task", "n_train", "n_test", "steps", "batch_size", "lr", "sample_batch_size",
             "checkpoint", "compile")
SFT_DEFAULTS = {preset: {k: d[k] for k in SFT_FLAGS} for preset, d in DEFAULTS.items()}

# -----------------------------------------------------------------------------
# Examples and batches

# What one forward and backward pass costs beyond its tokens, counted in tokens: the fixed
# per-pass work (kernel launches, the optimizer-free part of autograd's bookkeeping) that
# splitting a batch into more buckets pays again. tests/bench_training.py measures it.
BUCKET_OVERHEAD = 128


def make_example(task, p, completion, hint=False):
    """(prompt ids, completion ids + end-of-text) for one problem and one completion text."""
    return encode(task.prompt(p, hint=hint)), encode(completion) + [EOT]


def gold_examples(task, problems, with_hints=True):
    """P's worked examples; with their hinted copies, so the model learns the hint format."""
    out = [make_example(task, p, task.gold_completion(p)) for p in problems]
    if with_hints:
        out += [make_example(task, p, task.gold_completion(p), hint=True) for p in problems]
    return out


def collate(examples, device):
    """Right-padded (B, T) ids and targets; the prompt and the padding get target -1 (ignored),
    so the loss covers the whole completion and nothing else (STaR's released code began the
    mask at the last ':' and so skipped most of the scratchpad: a pitfall we avoid)."""
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
    """Mean token loss of a global batch of examples in one padded forward pass (under
    torchrun, of this process's share, scaled so that the averaged gradient is the whole
    batch's: model.split_batch). The textbook twin of batch_backward; the tests compare them."""
    share, n_targets = split_batch(batch, size=lambda ex: len(ex[1]))
    return summed_loss(forward, share, device, n_targets)


def length_buckets(lengths, overhead=None):
    """Indices of a batch grouped into buckets of similar length, so that little of what a
    forward pass computes is padding. A bucket costs (rows x its longest length) tokens plus a
    fixed `overhead` (a forward pass's cost beyond its tokens, in tokens); over the lengths
    sorted, the cheapest split is found exactly by dynamic programming (n <= a few hundred)."""
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
    """batch_loss(...).backward(), bucket by bucket (length_buckets): the same gradient with
    little padding computed. Each bucket's summed loss is divided by the whole batch's target
    count, so the gradients add up to the batch mean's. Under torchrun the gradients are
    averaged only after the last bucket (no_sync before it). Returns the loss value."""
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
    """Supervised fine-tuning on (prompt, completion) examples; returns the last losses' mean.
    Each step draws batch_size examples and runs them in length buckets (batch_backward).
    compile=True runs the forward through torch.compile (shapes vary, so dynamic=True)."""
    if not examples:
        raise ValueError("nothing to fine-tune on: the example set is empty")
    device = next(model.parameters()).device
    forward = wrap_ddp(torch.compile(model, dynamic=True) if compile else model)
    opt = model.configure_optimizer(lr)
    rng = random.Random(seed)  # the same batches in every process
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        opt.zero_grad(set_to_none=True)
        losses.append(batch_backward(forward, batch, device))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


# -----------------------------------------------------------------------------
# Sampling and evaluation

@functools.cache
def completion_cap(task, difficulty):
    """How many tokens the sampler lets a model write at a difficulty: a quarter more than the
    longest gold completion (end-of-text included) of 256 problems that the task samples at
    that difficulty from a fixed seed, plus 8. It reads the task and the difficulty, never the
    problems being solved, so no test answer's length leaks into how long the model may write."""
    rng = random.Random(f"completion cap {task.name} {difficulty}")
    longest = max(len(task.gold_completion(task.sample(rng, difficulty))) for _ in range(256))
    return int((longest + 1) * 1.25) + 8


def sample(model, task, problems, hint=False, n=1, temperature=0.0, batch_size=256, seed=0,
           desc="sample"):
    """n completions per problem (texts, end-of-text stripped), in problem order, and the number
    of tokens generated. Sample j of problem i is drawn with seed_for(seed, i, j), so it is the
    same whatever batch or process it lands in. Problems are batched by difficulty, so that
    the rows of a batch have similar lengths.
    Under torchrun each process samples the problems i with i % processes == rank, and every
    process gets back all the texts. A task with a tool (a calculator) has it called by the
    sampler: the counts include the tokens it wrote."""
    device = next(model.parameters()).device
    rank, world = rank_world()
    jobs = sorted((p.difficulty, i, j) for i, p in enumerate(problems) for j in range(n)
                  if i % world == rank)
    done, n_tokens = [], 0
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
            done.append((i, j, decode(row[:-1] if row and row[-1] == EOT else row)))
    texts = [[None] * n for _ in problems]
    shares = all_gather((done, n_tokens))  # torchrun: every process's share; else just ours
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
    by_diff = {}
    for p, ok in zip(problems, right):
        by_diff.setdefault(p.difficulty, []).append(ok)
    acc = {d: sum(v) / len(v) for d, v in sorted(by_diff.items())}
    return acc, sum(right) / len(right), texts


# -----------------------------------------------------------------------------
# M0: the model trained on the worked examples P (the starting point, and the P-only baseline)

def train_start_model(model, task, P, args, desc="SFT on P"):
    """Fine-tune a fresh model on P's gold rationales (with hinted copies); returns the loss."""
    return finetune(model, gold_examples(task, P), args.steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "sft"), desc=desc, compile=args.compile)


def direct_examples(task, problems):
    """Question -> answer with no rationale: the paper's direct-answer baseline."""
    return [make_example(task, p, task.completion([], p.answer)) for p in problems]


# -----------------------------------------------------------------------------
# The STaR loop (Algorithm 1)

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
    """One iteration: generate, keep, rationalize, fine-tune. Returns (model, stats)."""
    # seeds derive from the iteration alone, so a resumed run samples what it would have
    # 1-2. rationales from M(n-1), kept when the final answer checks out
    texts, n_tok = sample(prev, task, D, n=args.samples, temperature=args.temperature,
                          batch_size=args.sample_batch_size,
                          seed=seed_for(args.seed, "generate", n),
                          desc=f"iter {n}: generate")
    kept, solved = keep_verified(task, D, texts)
    n_generated = len(kept)
    # 3. rationalization: the failures again, with the answer as a hint; saved without it
    failed = [p for i, p in enumerate(D) if i not in solved]
    if args.rationalize and failed:
        hinted, n_tok_h = sample(prev, task, failed, hint=True, n=args.samples,
                                 temperature=args.temperature, batch_size=args.sample_batch_size,
                                 seed=seed_for(args.seed, "rationalize", n),
                                 desc=f"iter {n}: rationalize")
        kept += keep_verified(task, failed, hinted)[0]
        n_tok += n_tok_h
    # 4. fine-tune from the start model (restart, as the paper) or from M(n-1)
    model = load_checkpoint(start_path, device)[0] if args.restart else prev
    steps = iteration_steps(args, n)
    loss = finetune(model, gold_examples(task, P) + kept, steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "fine-tune", n), desc=f"iter {n}: fine-tune",
                    compile=args.compile)
    stats = {"kept_generated": n_generated, "kept_rationalized": len(kept) - n_generated,
             "solved_D": len(solved) / len(D), "train_steps": steps, "train_loss": loss,
             "sampled_tokens": n_tok}
    return model, kept, stats


# -----------------------------------------------------------------------------
# The driver: logs every iteration and resumes an interrupted run where it stopped

def sample_lines(task, problems, texts, k=8):
    """A few test problems with the model's completions, for a person to read."""
    out = []
    for p, t in list(zip(problems, texts))[:k]:
        verdict = "right" if task.check(p, t) else "wrong"
        out.append(f"{task.prompt(p)}{t}\n[{verdict}; gold answer {p.answer}]\n")
    return out


def run(args, task, P, D, test, out, device, new_model):
    """Iteration 0 trains M0 on P (this is all of --method sft); iterations 1.. are STaR.

    Everything an iteration produced (checkpoint, kept data, samples) is written atomically
    before its row is appended to metrics.jsonl; that row is the commit point. Started again on
    the same folder, the run continues after the last committed iteration.
    """
    metrics = os.path.join(out, "metrics.jsonl")
    done = {r["iteration"] for r in read_jsonl(metrics) if r.get("kind") == "iteration"}
    start_path = os.path.join(out, "start.pt")
    ckpt = lambda n: os.path.join(out, f"model_iter{n}.pt")  # noqa: E731

    def commit(n, model, stats, t0, kept=None):
        acc, overall, texts = evaluate(model, task, test, args.sample_batch_size)
        save_checkpoint(ckpt(n), model, TOKENIZER, extra={"iteration": n})
        if kept is not None:
            write_jsonl(os.path.join(out, f"kept_iter{n}.jsonl"),
                        [{"prompt": decode(p), "completion": decode(c[:-1])} for p, c in kept])
        write_atomic(os.path.join(out, f"samples_iter{n}.txt"),
                     "\n".join(sample_lines(task, test, texts)))
        row = {"kind": "iteration", "iteration": n, "accuracy": overall,
               "accuracy_by_difficulty": {str(d): a for d, a in acc.items()},
               # each test problem's rightness, for paired intervals (tests/paired.py)
               "right": [int(task.check(p, t)) for p, t in zip(test, texts)],
               **stats, "wall_s": round(time.time() - t0, 1)}
        append_jsonl(metrics, row)  # the commit point
        if n > 0 and os.path.exists(ckpt(n - 1)) and is_main():
            os.remove(ckpt(n - 1))  # only the newest iteration's model is kept (and M0)
        tqdm.write(f"iteration {n}: accuracy {overall:.3f} | " +
                   " ".join(f"{d}:{a:.2f}" for d, a in acc.items()) +
                   (f" | kept {stats['kept_generated']}+{stats['kept_rationalized']}"
                    if n > 0 else ""))
        return model

    if 0 not in done:
        t0 = time.time()
        torch.manual_seed(args.seed)
        model = new_model()
        steps, loss = 0, None  # a given --checkpoint is M0 as it is
        if not args.checkpoint:
            steps, loss = args.steps, train_start_model(model, task, P, args)
        save_checkpoint(start_path, model, TOKENIZER, extra={"iteration": 0})
        prev = commit(0, model, {"train_steps": steps, "train_loss": loss}, t0)
    else:
        last = max(done)
        prev = load_checkpoint(ckpt(last), device)[0].eval()
        tqdm.write(f"resuming {out} after iteration {last}")

    for n in range(1, (args.iterations or 0) + 1):  # --method sft: none
        if n in done:
            continue
        t0 = time.time()
        model, kept, stats = star_iteration(prev, start_path, task, P, D, args, n, device)
        prev = commit(n, model, stats, t0, kept)

    if args.iterations and args.direct_baseline:
        run_direct_baseline(args, task, P, D, test, out, new_model)
    return prev


def run_direct_baseline(args, task, P, D, test, out, new_model):
    """The paper's baseline: the same network trained on question/answer pairs (P and D) with no
    rationales, from scratch, for as many steps as M0 plus every STaR iteration together."""
    metrics = os.path.join(out, "metrics.jsonl")
    if any(r.get("kind") == "direct" for r in read_jsonl(metrics)):
        return
    t0 = time.time()
    steps = args.steps + sum(iteration_steps(args, n) for n in range(1, args.iterations + 1))
    torch.manual_seed(args.seed)
    model = new_model()
    loss = finetune(model, direct_examples(task, P + D), steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "direct"), desc="direct-answer baseline",
                    compile=args.compile)
    acc, overall, _ = evaluate(model, task, test, args.sample_batch_size)
    append_jsonl(metrics, {"kind": "direct", "accuracy": overall,
                           "accuracy_by_difficulty": {str(d): a for d, a in acc.items()},
                           "train_steps": steps, "train_loss": loss,
                           "wall_s": round(time.time() - t0, 1)})
    tqdm.write(f"direct-answer baseline: accuracy {overall:.3f} | " +
               " ".join(f"{d}:{a:.2f}" for d, a in acc.items()))


# -----------------------------------------------------------------------------
# Report: plot and summary table

def summary_table(rows, difficulties):
    head = "| model | " + " | ".join(f"d={d}" for d in difficulties) + \
        " | all | kept (gen+rat) | steps | wall s |"
    lines = [head, "|" + "---|" * (len(difficulties) + 5)]
    for r in rows:
        name = f"iteration {r['iteration']}" if r["kind"] == "iteration" else "direct answer"
        if r.get("iteration") == 0:
            name = "iteration 0 (P only)"
        acc = r["accuracy_by_difficulty"]
        kept = f"{r['kept_generated']}+{r['kept_rationalized']}" if "kept_generated" in r else "-"
        lines.append(f"| {name} | " + " | ".join(f"{acc.get(str(d), float('nan')):.3f}"
                                                  for d in difficulties) +
                     f" | {r['accuracy']:.3f} | {kept} | {r['train_steps']} | {r['wall_s']} |")
    return "\n".join(lines)


def plot(out, rows, difficulties, title, trained=()):
    """STaR's Figure 4: test accuracy per difficulty across iterations; the run with and without
    rationalization side by side when both folders exist. Iteration 0 alone: one bar chart."""
    from matplotlib import colormaps
    runs = [(title, rows)]
    twin = out[:-len("-norat")] if out.endswith("-norat") else out + "-norat"
    if os.path.exists(os.path.join(twin, "metrics.jsonl")):
        twin_rows = read_jsonl(os.path.join(twin, "metrics.jsonl"))
        with_rat, without = (rows, twin_rows) if twin.endswith("-norat") else (twin_rows, rows)
        runs = [("with rationalization", with_rat), ("without rationalization", without)]
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
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("test accuracy (greedy)")
            ax.set_title(name)
            ax.grid(alpha=0.3)


def report(args, rows):
    """The summary table (returned) and accuracy.png, from the run's metrics rows."""
    plot(args.out, rows, args.test_difficulty, f"{args.method} on {args.task}",
         args.train_difficulty)
    return summary_table(rows, args.test_difficulty)


# -----------------------------------------------------------------------------
# Stream of Search (Gandhi et al. 2024, arXiv 2404.03683): learning to search in text
#
#   paths  <- SFT(base, P's optimal paths);   traces_0 <- SFT(base, P's search traces)
#   for n = 1..T:   (STaR on the model's own searches)
#       S <- traces of D sampled from traces_(n-1); keep those whose found path is right
#       traces_n <- fine-tune traces_0 on P's traces + the kept ones
#   test: greedy accuracy of each; one trace against the paths model's best-of-N at equal
#   tokens per problem (its own mean token log-prob picks; pass@N is the ceiling of its picks)
#
# The traces are tasks/countdown.search_trace's (dfs-near and dfs-sum mixed, failed searches
# kept). --calculator: "result" writes every a op b= result (both models), "judge" also the
# numbers a trace's step leaves and a leaf's verdict (the program as an environment; the paths
# model gets results only), "off" nothing.

SOS_DEFAULTS = {
    "tiny": dict(task="countdown", train_difficulty="3", test_difficulty="3", n_train=2000,
                 n_unlabeled=500, n_test=200, steps=1000, batch_size=32, lr=2e-3,
                 sample_batch_size=250, iterations=1, star_steps=300, step_growth=1.0,
                 samples=2, temperature=0.7, eval_samples=8, calculator="judge",
                 checkpoint=None, compile=False),
}
SOS_DEFAULTS["small"] = dict(SOS_DEFAULTS["tiny"], train_difficulty="3-4", test_difficulty="3-4",
                             n_train=5000, n_unlabeled=3000, n_test=500, steps=3000,
                             batch_size=64, lr=1e-3, sample_batch_size=500, star_steps=1000)
SOS_DEFAULTS["gpu"] = dict(SOS_DEFAULTS["small"], n_train=50000, n_unlabeled=20000,
                           n_test=2000, batch_size=256, sample_batch_size=2048, iterations=3,
                           eval_samples=64)


def sos_tasks(args):
    """The two views of countdown the two models learn: optimal paths, and search traces."""
    from tasks.countdown import Countdown, CountdownTraces
    on = args.calculator != "off"
    return Countdown("result" if on else None), CountdownTraces(args.calculator if on else None)


def tool_tokens(task, p, text):
    """How many of a completion's tokens the task's tool wrote: replayed at each "=" (the tool
    reads only the text before it, so this is what the sampler forced; a row cut by the length
    cap inside a write counts the whole write)."""
    if task.tool is None:
        return 0
    return sum(len(encode(task.tool(p, text[:i + 1]))) for i, ch in enumerate(text)
               if ch == task.tool.trigger)


def sos_eval(model, task, test, args):
    """Greedy test results of one model: accuracy, per-problem rightness, tokens per problem
    (the prompt, sampled, written by the tool) and, for traces, what the searches did."""
    from tasks.countdown import CountdownTraces, search_trace, trace_stats
    acc, overall, texts = evaluate(model, task, test, args.sample_batch_size)
    right = [int(task.check(p, t)) for p, t in zip(test, texts)]
    n = len(test)
    written = sum(tool_tokens(task, p, t) for p, t in zip(test, texts)) / n
    row = {"accuracy": overall, "accuracy_by_difficulty": {str(d): a for d, a in acc.items()},
           "right": right, "prompt_tokens": sum(len(encode(task.prompt(p))) for p in test) / n,
           "completion_tokens": sum(len(encode(t)) + 1 for t in texts) / n,
           "written_tokens": written}
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
    """The paths model's N samples per test problem, each problem's exact best-of-k (by the
    model's own mean token log-prob over the whole text: a calculator's result it did not
    expect lowers it, so it is close to an exact check) and pass@k for k = 1, 2, 4 .. N, and
    tokens per sample (its generation, and its scoring pass)."""
    from model import sequence_logprobs
    from vstar import best_of_k, pass_at_k
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
    best, passes = [[] for _ in ks], [[] for _ in ks]
    for i, (p, ts) in enumerate(zip(test, texts)):
        ok = [task.check(p, t) for t in ts]
        for j, k in enumerate(ks):
            best[j].append(best_of_k(score[i * N:(i + 1) * N], ok, k))
            passes[j].append(pass_at_k(N, sum(ok), k))
    # a sample costs its prompt and completion once (cached), and once more to be scored
    per_sample = 2 * sum(len(p) + len(c) for p, c in zip(prompts, comps)) / len(prompts)
    return {"k": ks, "best": best, "pass": passes, "tokens_per_sample": per_sample}


def run_sos(args, task, P, D, test, out, device, new_model):
    """The paths model, then the trace model and its STaR iterations; each model's row in
    metrics.jsonl is its commit point (a rerun on the folder resumes after it)."""
    paths, traces = sos_tasks(args)
    metrics = os.path.join(out, "metrics.jsonl")
    done = {r["model"] for r in read_jsonl(metrics) if r.get("kind") == "sos"}
    ckpt = lambda n: os.path.join(out, f"traces_iter{n}.pt")  # noqa: E731
    gold = {m: gold_examples(t, P, with_hints=False) for m, t in (("paths", paths),
                                                                    ("traces", traces))}
    for n in [-1] + list(range(args.iterations + 1)):  # -1: the paths model
        name = "paths" if n < 0 else f"traces {n}"
        if name in done:
            continue
        t0, stats, examples = time.time(), {}, gold["paths" if n < 0 else "traces"]
        if n <= 0:
            torch.manual_seed(args.seed)
            model, steps = new_model(), args.steps
        else:  # STaR: the previous model's own searches of D, kept when their path is right
            prev = load_checkpoint(ckpt(n - 1), device)[0].eval()
            texts, _ = sample(prev, traces, D, n=args.samples, temperature=args.temperature,
                              batch_size=args.sample_batch_size,
                              seed=seed_for(args.seed, "sos generate", n),
                              desc=f"traces {n}: sample D")
            kept, solved = keep_verified(traces, D, texts)
            model, steps = load_checkpoint(ckpt(0), device)[0], iteration_steps(args, n)
            examples = examples + kept
            stats = {"kept": len(kept), "solved_D": len(solved) / len(D)}
        loss = finetune(model, examples, steps, args.lr, args.batch_size,
                        seed=seed_for(args.seed, "sos", name), desc=f"{name}: fine-tune",
                        compile=args.compile)
        row, texts = sos_eval(model, paths if n < 0 else traces, test, args)
        if n < 0:
            row["best_of_n"] = best_of_n(model, paths, test, args)
        else:
            save_checkpoint(ckpt(n), model, TOKENIZER, extra={"iteration": n})
        write_atomic(os.path.join(out, f"samples_{name.replace(' ', '')}.txt"),
                     "\n".join(sample_lines(traces if n >= 0 else paths, test, texts, k=12)))
        mean_len = sum(len(c) for _, c in examples) / len(examples)
        append_jsonl(metrics, {"kind": "sos", "model": name, **row, **stats,
                               "train_steps": steps, "train_loss": loss,
                               "trained_tokens": round(steps * args.batch_size * mean_len),
                               "wall_s": round(time.time() - t0, 1)})
        tqdm.write(f"{name}: greedy accuracy {row['accuracy']:.3f}")


def sos_compare(rows):
    """The headline differences, each (mean, 95% paired interval) over the test problems: the
    first trace model and the last STaR one against the paths model's greedy answer, and at
    the largest k whose tokens per problem are no more than the trace's, against its best-of-k
    and its pass@k (the exact check, which "judge" gives the traces too); the last STaR
    iteration against the first trace model."""
    from model import bootstrap_ci
    by = {r["model"]: r for r in rows if r.get("kind") == "sos"}
    its = sorted((r for r in by.values() if r["model"].startswith("traces")),
                 key=lambda r: int(r["model"].split()[1]))
    if "paths" not in by or not its:
        return {}
    paths, bon = by["paths"], by["paths"]["best_of_n"]
    diff = lambda a, b: (sum(x - y for x, y in zip(a, b)) / len(a),  # noqa: E731
                         bootstrap_ci([x - y for x, y in zip(a, b)]))
    out = {}
    for r in dict.fromkeys([its[0]["model"], its[-1]["model"]]):
        t = by[r]
        cost = t["prompt_tokens"] + t["completion_tokens"]
        # best-of-k pays a scoring pass per sample; the exact check of pass@k costs nothing
        for key, name, per in (("best", "best-of-", bon["tokens_per_sample"]),
                               ("pass", "pass@", bon["tokens_per_sample"] / 2)):
            j = max([0] + [j for j, k in enumerate(bon["k"]) if k * per <= cost])
            out[f"{r} - paths {name}{bon['k'][j]} (equal tokens)"] = diff(t["right"],
                                                                          bon[key][j])
        out[f"{r} - paths greedy"] = diff(t["right"], paths["right"])
    if len(its) > 1:
        out[f"{its[-1]['model']} - {its[0]['model']}"] = diff(its[-1]["right"], its[0]["right"])
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
            ax.set_xlabel("tokens processed per problem (prompt, sampled, written, scored)")
            ax.set_ylabel("held-out accuracy")
            ax.set_title(f"Stream of Search on countdown (calculator: {args.calculator})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return "\n".join(lines)
