"""
What every method shares that is not the model: statistics, the learning-rate schedule and the
optimiser step, seeds, files (JSON lines, atomic writes, figures), a run's resume points,
devices and checkpoints, the torchrun helpers, and the types of the command line's flags.
model.py is the network and its sampler; the method files build on both.

Tested in tests/test_model.py (checkpoints, seeds, batch split), test_vstar.py (estimators),
test_search.py (votes, TokenCount), test_train.py (flags), test_star.py (resume).
"""

import argparse
import hashlib
import json
import math
import os
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from itertools import groupby, product

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# Statistics: 95% bootstrap intervals over test problems


def bootstrap_ci(values, reps=2000, seed=0):
    """95% percentile-bootstrap interval of the mean of per-problem values, resampling problems;
    for a difference between two methods, pass the per-problem differences."""
    values = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(values), (reps, len(values)))
    lo, hi = np.percentile(values[idx].mean(1), [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(a, b):
    """Mean of a - b over the same problems, and its 95% paired bootstrap interval."""
    diff = [x - y for x, y in zip(a, b)]
    return sum(diff) / len(diff), bootstrap_ci(diff)


def with_ci(mean, ci):
    """A difference and its interval as every report writes them: "+0.010 (+0.000 to +0.023)"."""
    return "{:+.3f} ({:+.3f} to {:+.3f})".format(mean, *ci)


# Unbiased estimators over n samples of one problem (pass@k, best-of-k, majority@k)

def pass_at_k(n, c, k):
    """P(one of k of n samples, c right, is right): Chen et al. 2021, 1 - C(n-c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def best_of_k(scores, correct, k):
    """P(the top-scored of k of n samples is right): sum_i C(n-i-1, k-1) a_i / C(n, k), sorted by
    score (V-STaR, section 4), a_i the mean rightness of i's tie group (a tie picks uniformly)."""
    n, a = len(scores), []
    for _, group in groupby(sorted(range(n), key=lambda i: -scores[i]), key=lambda i: scores[i]):
        group = [float(correct[i]) for i in group]
        a += [sum(group) / len(group)] * len(group)
    return sum(math.comb(n - i - 1, k - 1) * a[i] for i in range(n - k + 1)) / math.comb(n, k)


def majority_at_k(answers, right_answers, k):
    """P(majority vote over k of n samples is right), exactly: answers (None never votes), the
    right ones among them right_answers; a tie of t top answers credits 1/t each."""
    return sum(_majority_credit(answers, a, k)  # (in a fixed order: the same float sum in
               for a in sorted(set(right_answers) - {None}, key=str))  # every process)


def right_answers(answers, right):
    """The answers that count as right in one problem's pool: those of its right samples."""
    return {a for a, ok in zip(answers, right) if ok}


def _majority_credit(answers, right_answer, k):
    """majority_at_k's credit of one answer: for each j votes it gets, count by dynamic
    programming the ways the other answers stay below j or tie at j (and how many tie)."""
    n, groups = len(answers), Counter(a for a in answers if a is not None)
    c = groups.pop(right_answer, 0)
    n_none = n - c - sum(groups.values())
    others = list(groups.values())
    total = 0.0
    for j in range(1, min(c, k) + 1):
        # ways[m][t]: the ways to pick m samples of the other answers, none over j votes, t at j
        ways = [[0] * (len(others) + 1) for _ in range(k + 1)]
        ways[0][0] = 1
        for g in others:
            new = [[0] * (len(others) + 1) for _ in range(k + 1)]
            for m, t in product(range(k + 1), range(len(others) + 1)):
                if ways[m][t]:
                    for x in range(min(g, j, k - m) + 1):
                        new[m + x][t + (x == j)] += ways[m][t] * math.comb(g, x)
            ways = new
        for m in range(max(0, k - j - n_none), k - j + 1):  # the k - j - m others: unparsable
            for t in range(len(others) + 1):
                if ways[m][t]:
                    total += math.comb(c, j) * ways[m][t] * math.comb(n_none, k - j - m) / (t + 1)
    return total / math.comb(n, k)


def vote(answers, weights=None):
    """The answer of most votes (or summed weights); None (unparsable) casts none. Ties go to the
    answer seen first: the samples are i.i.d., so that is a uniform tie break."""
    total, first = {}, {}
    for j, a in enumerate(answers):
        if a is not None:
            total[a] = total.get(a, 0.0) + (1.0 if weights is None else weights[j])
            first.setdefault(a, j)
    return max(total, key=lambda a: (total[a], -first[a])) if total else None


def weighted_vote_accuracy(answers, right, k, weights, rng, trials=32):
    """Mean rightness of the weighted vote over `trials` random k-subsets of one problem's pool
    (Monte Carlo: no exact count is known for summed weights)."""
    right_of = {a: ok for a, ok in zip(answers, right)}  # an answer's samples agree on rightness
    hits = 0
    for _ in range(trials):
        sub = rng.sample(range(len(answers)), k)
        won = vote([answers[j] for j in sub], [weights[j] for j in sub])
        hits += won is not None and right_of[won]
    return hits / trials


# -----------------------------------------------------------------------------
# Compute: the tokens every network processes, counted where they are spent

class TokenCount:
    """Tokens the networks process: `sampled` by the generator, `prompt` (prompt and prefix
    tokens it encodes) and `scored` (read by scorers, times relative_size); padding uncounted.
    add() with a key (a problem's question) also counts them apart for that key."""
    KINDS = ("sampled", "prompt", "scored")

    def __init__(self, sampled=0, prompt=0, scored=0):
        self.sampled, self.prompt, self.scored = sampled, prompt, scored
        self.written = 0  # of sampled, those a tool wrote (the sampler's own count)
        self.by = {}  # key -> [sampled, prompt, scored]

    def add(self, kind, n, key=None):
        setattr(self, kind, getattr(self, kind) + n)
        if key is not None:
            self.by.setdefault(key, [0, 0, 0])[self.KINDS.index(kind)] += n

    def counts(self, key=None):
        """[sampled, prompt, scored]: in all, or of one key."""
        return [self.sampled, self.prompt, self.scored] if key is None else \
            list(self.by.get(key, [0, 0, 0]))


def relative_size(net, generator):  # a token `net` reads, in generator tokens
    return sum(p.numel() for p in net.parameters()) / sum(p.numel() for p in generator.parameters())


# -----------------------------------------------------------------------------
# Training: the learning-rate schedule and one optimiser step

def lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def optimizer_step(opt, params, lr=None, clip=1.0):
    """One update after the loss's backward, the same in every training loop: this step's
    learning rate (None: the optimiser's own, constant), the gradients clipped to norm clip
    (None: not clipped), the step, then the gradients cleared for the next one."""
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Seeds

def seed_for(*parts):
    """A seed derived from its parts (the run's seed, a stage, an iteration, a problem, a
    sample), the same on every machine and process, unrelated for different parts."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch.Generator takes it


# -----------------------------------------------------------------------------
# Files: atomic writes, JSON lines, figures

def write_atomic(path, text):
    """Write a whole file aside, then rename it into place, so that an interrupted run never
    leaves half of it. Under torchrun only the main process writes."""
    if is_main():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    barrier()


def write_jsonl(path, rows):
    """rows (dicts) as a JSON-lines file, one per line, written atomically."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    """The rows of a JSON-lines file; [] if there is no file yet."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path, *rows):
    """Append rows in one atomic rewrite (the files are a few rows long)."""
    write_jsonl(path, read_jsonl(path) + list(rows))


@contextmanager
def figure(path, **subplots):
    """(fig, axes) of plt.subplots(**subplots), drawn off screen, laid out, saved to path at
    110 dpi and closed when the block ends: every method's plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


# -----------------------------------------------------------------------------
# A run's resume points: each stage appends its metrics rows last

def committed(out, key, kind=None):
    """What a run in folder out has finished: the values of key in its metrics.jsonl rows (of
    this kind, if given). Each stage appends its rows last, after every file it wrote (the
    commit point), so a run started again on the folder skips these and resumes after them."""
    return {r[key] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
            if key in r and (kind is None or r.get("kind") == kind)}


def commit(out, t0, *rows):
    """Append a finished stage's rows, each with the stage's wall time since t0, to
    out/metrics.jsonl in one atomic write: the stage's commit point."""
    wall = round(time.time() - t0, 1)
    append_jsonl(os.path.join(out, "metrics.jsonl"), *({**r, "wall_s": wall} for r in rows))


# -----------------------------------------------------------------------------
# Devices and checkpoints

def autodetect_device():
    """cuda, mps and cpu are three distinct cases (an Apple GPU is neither of the others)."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast(device):
    """bf16 autocast on a GPU that supports it; full fp32 elsewhere (CPU, mps, older GPUs)."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def save_checkpoint(path, model, tokenizer, extra=None):
    """Save config, weights and the tokenizer's name; atomic (written aside, then renamed)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves its original
    ckpt = {"config": asdict(model.config), "model": model.state_dict(),
            "tokenizer": tokenizer, "extra": extra or {}}
    if is_main():  # torchrun: one process writes, the others wait and may then read it
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    barrier()


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict) from save_checkpoint's file; the dict has 'tokenizer', 'extra'."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


# -----------------------------------------------------------------------------
# More than one process (torchrun, see train.py): with a single process each is a no-op.

def rank_world():
    """(this process's rank, number of processes): (0, 1) unless torchrun started a group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    """Only the main process writes files and prints."""
    return rank_world()[0] == 0


def barrier():
    if rank_world()[1] > 1:
        dist.barrier()


def all_gather(obj):
    """Every process's obj (any picklable object), in rank order; [obj] with one process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model):
    """Under torchrun, the model in DistributedDataParallel (gradients averaged over the
    processes after backward); with one process, the model itself."""
    return DDP(model) if rank_world()[1] > 1 else model


def my_share(n):
    """This process's indices of n items (problems) under torchrun: every world-th from its rank."""
    rank, world = rank_world()
    return list(range(rank, n, world))


def merge_shares(results, counts):
    """Every process's results (key -> result) merged in key order, and their counts summed."""
    merged, total = {}, [0] * len(counts)
    for res, cnt in all_gather((results, list(counts))):
        merged.update(res)
        total = [a + b for a, b in zip(total, cnt)]
    return dict(sorted(merged.items())), total


def split_batch(batch, size=lambda item: 1):
    """This process's share of a global batch every process drew identically, and the divisor
    of its summed loss: the global batch's size(item) total / the number of processes, so that
    DDP's averaged gradients equal the single-process step on the whole batch's mean loss
    (size: 1 per example; its tokens, for a token-level loss)."""
    rank, world = rank_world()
    return batch[rank::world], sum(size(item) for item in batch) / world


# -----------------------------------------------------------------------------
# The command line: each method's file holds a table of flag rows (flag, presets); train.py
# collects them. Bad values are refused by argparse with one line naming them.

def checked(cast, ok, rule):
    """An argparse type: text -> cast(text), refused with `rule` unless ok(value)."""
    def check(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} {rule}")
        return value
    return check


def positive(cast):
    return checked(cast, lambda v: v > 0, "must be greater than 0")


def non_negative(cast):
    return checked(cast, lambda v: v >= 0, "must be 0 or more")


SWITCH = "switch"  # a flag's kind: it takes no value and turns the method's value over


def flag(name, kind, value, help, dest=None):
    """One row of a method's flag table: (args.<dest> it sets, its names, add_argument's
    keywords, its value per preset). kind: an argparse type, a list of choices, or SWITCH;
    value: one for every preset, or a tuple (tiny, small, gpu). dest: from the name if None."""
    values = dict(zip(("tiny", "small", "gpu"), value if isinstance(value, tuple) else [value] * 3))
    if kind == SWITCH:
        kw = {"action": "store_const", "const": not values["tiny"]}
    else:
        kw = {"choices": kind} if isinstance(kind, list) else {"type": kind}
    dest = dest or name[2:].replace("-", "_")
    return dest, (name,), {**kw, "dest": dest, "help": help}, values


def setting(name, value):
    """A method's value (or per-preset tuple) for a flag every method takes (train.py's)."""
    return flag(name, None, value, None)


def presets(table):
    """A flag table's values by preset: {preset: {dest: value}}, what a run uses by default."""
    return {p: {dest: values[p] for dest, _, _, values in table} for p in ("tiny", "small", "gpu")}
