"""
STaR, the Self-Taught Reasoner (Zelikman, Wu, Mu, Goodman 2022, arXiv 2203.14465), Algorithm 1:

  M0 <- train_start_model(P)                       # gold rationales, plain and hinted
  for n = 1..N:                                    # star_iteration
      kept <- keep_verified(D, sample(M(n-1), D))  # rationales whose answer checks out
      kept += keep_verified(failed, sample(M(n-1), failed, hint=True))   # rationalize
      M(n) <- finetune(M0, P + kept, iteration_steps(n)); held_out_results(M(n)); commit
The first half of the file is what every method that fine-tunes and samples builds on (collate,
batch_backward, finetune, sample, evaluate); V-STaR, search and Stream of Search import it.
Run: python train.py --method star | sft (M0 alone)   (--help for the ablation flags)
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
from itertools import accumulate

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (SWITCH, TokenCount, all_gather, autocast, commit, committed, figure, flag,
                    is_main, load_checkpoint, lr_at, my_share, non_negative, optimizer_step,
                    paired_difference, positive, presets, read_jsonl, save_checkpoint, seed_for,
                    setting, split_batch, with_ci, wrap_ddp, write_atomic, write_jsonl)
from model import generate, right_pad
from tasks import EOT, NOT_TEXT, PAD, TOKENIZER, decode, encode

# Every flag star takes beyond train.py's own, with its value per preset (tiny: a 2-core CPU in
# minutes; small; gpu: one H100). train.py fills each flag left unset from here.
FLAGS = [
    setting("--task", "addition"),
    # data
    flag("--n-train", positive(int), 300, "size of P, problems with gold rationales"),
    flag("--n-unlabeled", positive(int), (600, 2000, 10000),
         "size of D, problems with answers but no rationales"),
    flag("--n-test", positive(int), (300, 500, 2000), "held-out test problems"),
    # M0: supervised fine-tuning on P
    flag("--checkpoint", str, None, "start from this model instead of training M0 on P"),
    flag("--steps", positive(int), (1000, 3000, 3000), "fine-tuning steps of M0 on P"),
    flag("--batch-size", positive(int), (32, 64, 256), "examples per training step"),
    flag("--lr", positive(float), (2e-3, 1e-3, 1e-3), "peak learning rate"),
    flag("--compile", SWITCH, False, "torch.compile the training forward"),
    # the STaR loop
    flag("--iterations", non_negative(int), (3, 6, 8), "STaR iterations after M0"),
    flag("--star-steps", positive(int), (400, 800, 1000),
         "fine-tuning steps of the first iteration"),
    flag("--step-growth", positive(float), 1.2,
         "steps multiply by this every iteration (the paper: 1.2)"),
    flag("--no-rationalize", SWITCH, True, "skip rationalization (the paper's ablation)",
         dest="rationalize"),
    flag("--continue-training", SWITCH, True,
         "fine-tune from M(n-1) instead of restarting from M0", dest="restart"),
    flag("--direct-baseline", SWITCH, False,
         "also train the direct-answer baseline (no rationales, as many steps)"),
    flag("--no-step-control", SWITCH, True, "skip the step-matched control (M0 trained on P "
         "alone for as many more steps as the last STaR model)", dest="step_control"),
    # sampling
    flag("--sample-batch-size", positive(int), (300, 500, 2048), "prompts per sampling batch"),
    flag("--samples", positive(int), 1, "samples per problem per iteration (the paper: 1)"),
    flag("--temperature", float, 0.0, "sampling temperature; 0 is greedy (the paper's)"),
]
DEFAULTS = presets(FLAGS)
# --method sft is iteration 0 alone: M0 trained on P (or --checkpoint as it is), tested
SFT_FLAGS = [row for row in FLAGS if row[0] in ("task", "n_train", "n_test", "steps",
                                                "batch_size", "lr", "sample_batch_size",
                                                "checkpoint", "compile")]

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
    # 1) the forward (compiled, DDP-wrapped under torchrun) and a fresh optimiser
    device = next(model.parameters()).device
    forward = wrap_ddp(torch.compile(model, dynamic=True) if compile else model)
    opt = model.configure_optimizer(lr)
    opt.zero_grad(set_to_none=True)
    rng, losses = random.Random(seed), []  # rng: the same batches in every process
    # 2) each step: a batch drawn with replacement, its gradient bucket by bucket, one update
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
    """n completions per problem (end-of-text stripped), and a TokenCount of the tokens the
    model processed: sampled (a tool's writes included, and counted as `written` by the
    sampler) and prompt (encoded once per batch for all of a problem's samples, whose cache
    rows share it). Sample j of problem i is drawn with seed_for(seed, i, j) in any batch; under
    torchrun each process samples its share, and every process gets all texts and the count."""
    # 1) this process's (difficulty, problem, sample) jobs, sorted so a batch has one length
    device = next(model.parameters()).device
    jobs = sorted((problems[i].difficulty, i, j) for i in my_share(len(problems))
                  for j in range(n))
    # 2) each batch sampled with the cache, a row capped at its own difficulty's length
    results, cost = [], TokenCount()
    bar = tqdm(range(0, len(jobs), batch_size), desc=desc, leave=False, dynamic_ncols=True)
    for start in bar:
        chunk = jobs[start:start + batch_size]
        owners = list(dict.fromkeys(i for _, i, _ in chunk))  # each problem's prompt once
        prompts = [encode(task.prompt(problems[i], hint=hint)) for i in owners]
        max_new = min(max(completion_cap(task, d) for d, _, _ in chunk),
                      model.config.block_size - max(map(len, prompts)))
        tool = task.tool and row_tool(task, [problems[i] for _, i, _ in chunk])
        with autocast(str(device)):
            tokens, _, lengths = generate(model, prompts, max_new, stop_tokens=(EOT,),
                                          pad_id=PAD, temperature=temperature,
                                          banned_tokens=NOT_TEXT,
                                          copies=[sum(i == u for _, i, _ in chunk) for u in owners],
                                          seeds=[seed_for(seed, i, j) for _, i, j in chunk],
                                          tool=tool)
        tokens, lengths = tokens.tolist(), lengths.tolist()
        cost.sampled += sum(lengths)
        cost.prompt += sum(map(len, prompts))
        for r, ((d, i, j), row, n_tok) in enumerate(zip(chunk, tokens, lengths)):
            row = row[:min(n_tok, completion_cap(task, d))]  # its own cap, not its batch's
            cost.written += sum(tool.written[r][:len(row)]) if tool else 0
            results.append((i, j, decode(row[:-1] if row and row[-1] == EOT else row)))
    # 3) every process's texts, in problem and sample order
    texts, total = [[None] * n for _ in problems], TokenCount()
    for share, counts, written in all_gather((results, cost.counts(), cost.written)):
        for i, j, text in share:  # torchrun: every process's
            texts[i][j] = text
        total = TokenCount(*(a + b for a, b in zip(total.counts(), counts)))
        total.written += written
    return texts, total


def continue_prefixes(model, prefixes, copies, max_new, stop, temperature, seeds, cost,
                      tool=None, keys=None):
    """copies[u] continuations of each token list prefixes[u], each to a stop token (kept) or
    max_new tokens, counted into `cost` (tokens a tool wrote included; with keys, prefix u's
    under keys[u] too). Row r is drawn from seeds[r] with all the room the block leaves its
    prefix (batched apart by room): it depends on neither its batch nor its process. tool:
    row_tool over the prefixes, or None."""
    room = [min(max_new, model.config.block_size - len(x)) for x in prefixes]
    first, rows = [0, *accumulate(copies)], [None] * len(prefixes)  # prefix u's first row
    for r in sorted(set(room), reverse=True):
        group = [u for u in range(len(prefixes)) if room[u] == r]
        owner = [u for u in group for _ in range(copies[u])]  # the prefix of each row
        rows_tool = tool and tool.over(owner)
        with autocast(str(next(model.parameters()).device)):
            tokens, _, lengths = generate(
                model, [prefixes[u] for u in group], r, stop, PAD, temperature,
                banned_tokens=NOT_TEXT, copies=[copies[u] for u in group],
                seeds=[seeds[first[u] + j] for u in group for j in range(copies[u])],
                tool=rows_tool)
        cost.written += sum(map(sum, rows_tool.written)) if rows_tool else 0
        sampled = iter(row[:n] for row, n in zip(tokens.tolist(), lengths.tolist()))
        for u in group:
            rows[u] = [next(sampled) for _ in range(copies[u])]
    for u, rs in enumerate(rows):  # each prefix encoded once (its cache rows shared)
        cost.add("sampled", sum(map(len, rs)), keys and keys[u])
        cost.add("prompt", len(prefixes[u]), keys and keys[u])
    return [row for rs in rows for row in rs]


def row_tool(task, problems, texts=None):
    """The task's tool (a calculator) as the sampler calls it: row r of the batch, problems[r]'s,
    continuing texts[r] (None: the prompt), gets the ids of what the tool writes. over(owner):
    the same for rows whose problem and text are owner[r]'s."""
    def call(r, ids):
        return encode(task.tool(problems[r], (texts[r] if texts else "") + decode(ids)))
    call.trigger = encode(task.tool.trigger)[0]
    call.over = lambda owner: row_tool(task, [problems[u] for u in owner],
                                       texts and [texts[u] for u in owner])
    return call


def tool_written(task, p, text):
    """Which characters of a completion (one token each) the task's tool wrote, replayed: after
    each trigger the model wrote, what the tool answers there, where the text has it (a row cut
    mid-write has part of it). A trigger inside the tool's own writing is not the model's."""
    written = [False] * len(text)
    i = 0
    while task.tool is not None and i < len(text):
        if text[i] == task.tool.trigger:
            answer = task.tool(p, text[:i + 1])
            n = next((k for k in range(len(answer), -1, -1)
                      if text[i + 1:i + 1 + k] == answer[:k]), 0)
            written[i + 1:i + 1 + n] = [True] * n
            i += n
        i += 1
    return written


def evaluate(model, task, problems, batch_size=256):
    """Greedy accuracy per difficulty, overall accuracy, the completions and their TokenCount."""
    texts, cost = sample(model, task, problems, temperature=0.0, batch_size=batch_size,
                         desc="evaluate")
    texts = [t[0] for t in texts]
    right = [task.check(p, t) for p, t in zip(problems, texts)]
    by_diff = {d: [ok for p, ok in zip(problems, right) if p.difficulty == d]
               for d in sorted({p.difficulty for p in problems})}
    acc = {d: sum(v) / len(v) for d, v in by_diff.items()}
    return acc, sum(right) / len(right), texts, cost


# -----------------------------------------------------------------------------
# The STaR loop (Algorithm 1), from M0: the model trained on the worked examples P

def train_start_model(model, task, P, args, desc="SFT on P"):
    """Fine-tune a fresh model on P's gold rationales (with hinted copies); returns the loss."""
    return finetune(model, gold_examples(task, P), args.steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "sft"), desc=desc, compile=args.compile)


def iteration_steps(args, n):
    """Fine-tuning steps of iteration n (1-based): they grow each iteration, as in the paper."""
    return int(round(args.star_steps * args.step_growth ** (n - 1)))


def process_ok(task, problems, texts):
    """How many completions that keep_verified keeps the process check accepts step by step."""
    return sum(task.check(p, t) and all(task.check_steps(p, t))
               for p, ts in zip(problems, texts) for t in ts)


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
    # 1) sample a rationale per problem of D, keep those whose answer checks out
    texts, cost = sample(prev, task, D, n=args.samples, temperature=args.temperature,
                          batch_size=args.sample_batch_size,
                          seed=seed_for(args.seed, "generate", n), desc=f"iter {n}: generate")
    kept, solved = keep_verified(task, D, texts)
    n_generated, steps_ok = len(kept), process_ok(task, D, texts)
    # 2) rationalize: the failures again, with the answer as a hint (kept without it)
    failed = [p for i, p in enumerate(D) if i not in solved]
    if args.rationalize and failed:
        hinted, cost_h = sample(prev, task, failed, hint=True, n=args.samples,
                                 temperature=args.temperature, batch_size=args.sample_batch_size,
                                 seed=seed_for(args.seed, "rationalize", n),
                                 desc=f"iter {n}: rationalize")
        kept += keep_verified(task, failed, hinted)[0]
        cost.sampled += cost_h.sampled
        steps_ok += process_ok(task, failed, hinted)
    # 3) fine-tune M0 again (the paper restarts) on P and everything kept
    model = load_checkpoint(start_path, device)[0] if args.restart else prev
    steps = iteration_steps(args, n)
    loss = finetune(model, gold_examples(task, P) + kept, steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "fine-tune", n), desc=f"iter {n}: fine-tune",
                    compile=args.compile)
    stats = {"kept_generated": n_generated, "kept_rationalized": len(kept) - n_generated,
             "kept_steps_ok": steps_ok / max(1, len(kept)),  # the rest: right answer, a wrong step
             "solved_D": len(solved) / len(D), "train_steps": steps, "train_loss": loss,
             "sampled_tokens": cost.sampled}
    return model, kept, stats


# -----------------------------------------------------------------------------
# The driver: commits every iteration and resumes an interrupted run where it stopped

def sample_lines(task, problems, texts, k=8):
    """A few test problems with the model's completions, for a person to read."""
    return [f"{task.prompt(p)}{t}\n[{'right' if task.check(p, t) else 'wrong'}; gold answer "
            f"{p.answer}]\n" for p, t in list(zip(problems, texts))[:k]]


def model_path(out, n):
    return os.path.join(out, f"model_iter{n}.pt")


def held_out_results(model, task, test, args):
    """A model's greedy results on the test set: (its metrics, its completions). With a tool,
    the tokens it wrote per problem (the sampler's count) too."""
    acc, overall, texts, cost = evaluate(model, task, test, args.sample_batch_size)
    row = {"accuracy": overall, "accuracy_by_difficulty": {str(d): a for d, a in acc.items()},
           # each test problem's rightness, for paired intervals (tests/paired.py)
           "right": [int(task.check(p, t)) for p, t in zip(test, texts)]}
    if task.tool is not None:
        row["written_tokens"] = cost.written / len(test)
    return row, texts


def save_iteration(out, task, test, n, model, texts, kept=None):
    """Iteration n's files: its model, the examples it kept and test samples to read."""
    save_checkpoint(model_path(out, n), model, TOKENIZER, extra={"iteration": n})
    if kept is not None:
        write_jsonl(os.path.join(out, f"kept_iter{n}.jsonl"),
                    [{"prompt": decode(p), "completion": decode(c[:-1])} for p, c in kept])
    write_atomic(os.path.join(out, f"samples_iter{n}.txt"),
                 "\n".join(sample_lines(task, test, texts)))


def delete_model(out, n):
    """Iteration n's model, once a newer one is committed (M0 stays as start.pt)."""
    if os.path.exists(model_path(out, n)) and is_main():
        os.remove(model_path(out, n))


def run(args, task, P, D, test, out, device, new_model):
    """Iteration 0 trains M0 on P (all of --method sft); iterations 1.. are STaR. Started again
    on the same folder, the run continues after the last committed iteration."""
    finished = committed(out, "iteration", kind="iteration")
    start_path = os.path.join(out, "start.pt")

    def end_stage(n, model, stats, t0, kept=None):  # iteration n: test, save, commit, report
        row, texts = held_out_results(model, task, test, args)
        save_iteration(out, task, test, n, model, texts, kept)
        commit(out, t0, {"kind": "iteration", "iteration": n, **row, **stats})
        if n > 0:
            delete_model(out, n - 1)
        tqdm.write(f"iteration {n}: accuracy {row['accuracy']:.3f} | " +
                   " ".join(f"{d}:{a:.2f}" for d, a in row["accuracy_by_difficulty"].items()) +
                   (f" | kept {stats['kept_generated']}+{stats['kept_rationalized']}" if n else ""))

    # 1) M0: trained on P (a given --checkpoint is M0 as it is), or the newest committed model
    if 0 in finished:
        prev = load_checkpoint(model_path(out, max(finished)), device)[0].eval()
        tqdm.write(f"resuming {out} after iteration {max(finished)}")
    else:
        t0, steps, loss = time.time(), 0, None
        torch.manual_seed(args.seed)
        prev = new_model()
        if not args.checkpoint:
            steps, loss = args.steps, train_start_model(prev, task, P, args)
        save_checkpoint(start_path, prev, TOKENIZER, extra={"iteration": 0})
        end_stage(0, prev, {"train_steps": steps, "train_loss": loss}, t0)
    # 2) the STaR iterations not yet committed (--method sft: none)
    for n in range(1, (args.iterations or 0) + 1):
        if n not in finished:
            t0 = time.time()
            prev, kept, stats = star_iteration(prev, start_path, task, P, D, args, n, device)
            end_stage(n, prev, stats, t0, kept)
    # 3) the step-matched control, and the paper's direct-answer baseline when asked for
    if args.iterations and args.step_control:
        run_step_control(args, task, P, test, out, start_path, device)
    if args.iterations and args.direct_baseline:
        run_direct_baseline(args, task, P, D, test, out, new_model)
    return prev


def run_step_control(args, task, P, test, out, start_path, device):
    """What more steps alone buy: M0 fine-tuned on P alone (its hinted copies too) as the last
    STaR model was beyond M0: its iteration's steps, or with --continue-training every
    iteration's, one schedule each, chained. What the kept rationales add is M(N) minus this,
    on the same test problems."""
    if committed(out, "kind", kind="control"):
        return
    t0, N = time.time(), args.iterations
    model = load_checkpoint(start_path, device)[0]
    runs = [N] if args.restart else range(1, N + 1)
    for n in runs:
        seed = seed_for(args.seed, "control") if n == N else seed_for(args.seed, "control", n)
        loss = finetune(model, gold_examples(task, P), iteration_steps(args, n), args.lr,
                        args.batch_size, seed=seed, desc="step-matched control",
                        compile=args.compile)
    steps = sum(iteration_steps(args, n) for n in runs)
    row, _ = held_out_results(model.eval(), task, test, args)
    commit(out, t0, {"kind": "control", **row, "train_steps": steps, "train_loss": loss})
    tqdm.write(f"step-matched control (P alone, {steps} more steps): accuracy "
               f"{row['accuracy']:.3f}")


def run_direct_baseline(args, task, P, D, test, out, new_model):
    """The paper's baseline: the same network trained on question/answer pairs (P and D) with no
    rationales, from scratch, for as many steps as M0 plus every STaR iteration together."""
    if committed(out, "kind", kind="direct"):
        return
    # 1) from scratch on the answers alone, as many steps as M0 and every iteration together
    t0 = time.time()
    steps = args.steps + sum(iteration_steps(args, n) for n in range(1, args.iterations + 1))
    torch.manual_seed(args.seed)
    model = new_model()
    direct = [make_example(task, p, task.completion([], p.answer)) for p in P + D]
    loss = finetune(model, direct, steps, args.lr, args.batch_size,
                    seed=seed_for(args.seed, "direct"), desc="direct-answer baseline",
                    compile=args.compile)
    # 2) tested greedily, committed
    acc, overall, *_ = evaluate(model, task, test, args.sample_batch_size)
    commit(out, t0, {"kind": "direct", "accuracy": overall,
                     "accuracy_by_difficulty": {str(d): a for d, a in acc.items()},
                     "train_steps": steps, "train_loss": loss})
    tqdm.write(f"direct-answer baseline: accuracy {overall:.3f} | " +
               " ".join(f"{d}:{a:.2f}" for d, a in acc.items()))


# -----------------------------------------------------------------------------
# Report: plot and summary table

def summary_table(rows, difficulties):
    """Markdown: each iteration's (the control's, the direct baseline's) accuracy per
    difficulty, then the last iteration against the step-matched control, paired."""
    lines = ["| model | " + " | ".join(f"d={d}" for d in difficulties) + " | all | kept "
             "(gen+rat) | share of kept, every step right | steps | wall s |",
             "|" + "---|" * (len(difficulties) + 6)]
    for r in rows:
        n = r.get("iteration")
        name = {"direct": "direct answer", "control": "step-matched control (P only)"}.get(
            r["kind"], "iteration 0 (P only)" if n == 0 else f"iteration {n}")
        acc = r["accuracy_by_difficulty"]
        kept = f"{r['kept_generated']}+{r['kept_rationalized']}" if "kept_generated" in r else "-"
        ok = f"{r['kept_steps_ok']:.3f}" if "kept_steps_ok" in r else "-"
        cells = " | ".join(f"{acc.get(str(d), float('nan')):.3f}" for d in difficulties)
        lines.append(f"| {name} | {cells} | {r['accuracy']:.3f} | {kept} | {ok} | "
                     f"{r['train_steps']} | {r['wall_s']} |")
    its = [r for r in rows if r["kind"] == "iteration"]
    control = next((r for r in rows if r["kind"] == "control"), None)
    if control and len(its) > 1:
        lines += ["", f"iteration {its[-1]['iteration']} - the step-matched control (95% paired "
                  f"CI): {with_ci(*paired_difference(its[-1]['right'], control['right']))}"]
    return "\n".join(lines)


def plot(out, rows, difficulties, title, trained=()):
    """STaR's Figure 4: test accuracy per difficulty across iterations, with and without
    rationalization side by side when both folders exist (iteration 0 alone: a bar chart)."""
    from matplotlib import colormaps
    # 1) this run, and beside it its twin with (or without) rationalization if there is one
    runs = [(title, rows)]
    twin = out[:-len("-norat")] if out.endswith("-norat") else out + "-norat"
    if os.path.exists(os.path.join(twin, "metrics.jsonl")):
        pair = [rows, read_jsonl(os.path.join(twin, "metrics.jsonl"))]
        runs = list(zip(("with rationalization", "without rationalization"),
                        pair if twin.endswith("-norat") else pair[::-1]))
    with figure(os.path.join(out, "accuracy.png"), ncols=len(runs),
                figsize=(5.5 * len(runs) + 1.5, 4), squeeze=False) as (fig, axes):
        # 2) a panel per run: a line per difficulty across iterations (M0 alone: bars)
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
