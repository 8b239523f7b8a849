"""
Quiet-STaR (Zelikman et al. 2024, arXiv 2403.09629; Algorithm 1 and ezelikman/quiet-star): the
model thinks after every token and learns which thoughts help it predict the text. Here a tiny GPT
learns chain-task lines, half of which show their work ("8+8*8+5:(6,8,3)3"), and is measured on
the answers of bare held-out lines ("8+8*8+5=3"). The thinking arm is compared with what the
same steps give without Quiet-STaR: the plain arm (a continuation without thoughts), the plain
arm's own greedy thoughts mixed in at a fixed w = 1, and a thinking arm without REINFORCE.

    base = base_stage(text)              # then the diagnostic: its own thoughts at w = 0 and 1
    arms = load_arms(base)               # plain; quiet + mixing head; no_reinforce + a copy
    for s in range(think_steps):         # think_training: every arm, the same batch and lr
        lm_step(plain, batch)
        th = think(quiet, head, batch)   # a thought after every position, all in parallel
        quiet_star_step: quiet_star_loss(th) = NLL(base) + NLL(mixed) + REINFORCE(thoughts)
        the same step for no_reinforce, REINFORCE's weight 0
        every eval_every steps: save_arms, then commit(evaluate_arms(arms))

Run: python train.py --method quiet_star     (python train.py --method quiet_star --help: its flags)
"""

import argparse
import copy
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (SWITCH, all_gather, autocast, bootstrap_ci, checked, commit, committed,
                    figure, flag, is_main, load_checkpoint, lr_at, non_negative, optimizer_step,
                    positive, presets, rank_world, read_jsonl, save_checkpoint, seed_for, setting,
                    with_ci, wrap_ddp, write_atomic)
from model import GPT, ConcatCache, get_config, sample_token
from tasks import EOT, EOTH, PAD, SOT, TOKENIZER, decode, encode, held_out, sample_problems
from tasks.text import line, pack, scratch, show_work

# Every flag quiet_star takes beyond train.py's own, with its value per preset (tiny, small, gpu).
# The loss weights, the meta-token multiplier and the neutral start are the official code's;
# thoughts are as long as the work at the training difficulty ("6,8,3": 5); the tiny preset's
# steps, and thinking at every third position, fit two CPU cores in 7 minutes.
FLAGS = [
    setting("--task", "chain"),
    setting("--train-difficulty", ("3", "4", "6")),  # steps per line
    setting("--test-difficulty", ("3", "4", "6")),
    # the text
    flag("--n-test", positive(int), (400, 1000, 2000), "held-out test lines"),
    flag("--worked-fraction", checked(float, lambda v: 0 <= v < 1, "is not in [0, 1): 1 leaves no "
                                      "bare lines to measure"), 0.5,
         "share of text lines that show their work (0: none)"),
    flag("--seq-len", positive(int), (48, 64, 128), "tokens per sequence (whole lines, padded)"),
    # stage 1: the base language model, from scratch
    flag("--base-steps", positive(int), (1200, 3000, 5000), "training steps of the base model"),
    flag("--batch-size", positive(int), (32, 32, 64), "sequences per training step"),
    flag("--lr", positive(float), (2e-3, 1e-3, 1e-3), "peak learning rate of the base"),
    # stage 2: Quiet-STaR and the plain arm side by side
    flag("--think-steps", positive(int), (120, 500, 2000), "steps after the base (every arm)"),
    flag("--continue-lr", positive(float), (5e-4, 3e-4, 3e-4), "peak lr after the base, every arm"),
    flag("--thought-len", non_negative(int), (5, 7, 11), "sampled tokens between start and end"),
    flag("--n-true", positive(int), 2, "true tokens teacher-forced after a thought (reward, loss)"),
    flag("--n-thoughts", positive(int), 2, "thoughts sampled per position (the reward's baseline)"),
    flag("--think-stride", positive(int), (3, 1, 1), "think every k-th training position (1: all)"),
    flag("--thought-temperature", positive(float), 1.0, "temperature of sampled training thoughts"),
    flag("--base-weight", float, 0.5, "weight of the base next-token NLL (the official code: 0.5)"),
    flag("--mixed-weight", float, 0.5, "weight of the mixed NLL over the n_true tokens (0.5)"),
    flag("--reinforce-weight", float, 1.0, "weight of REINFORCE on the thought tokens"),
    flag("--meta-lr-mult", positive(float), 100.0, "meta-token embeddings learn this much faster"),
    flag("--meta-max-change", positive(float), 0.01,
         "largest meta-token row step, x the median row norm (inf: unbounded, the official code)"),
    flag("--meta-init", ["dash", "paren"], "dash",
         "start both as '-' (the paper's neutral '---'), or as '(' and ')', the work's brackets"),
    flag("--mixing", ["tanh", "linear", "sigmoid"], "tanh",
         "mixing weight bound: tanh (-1..1), linear (none, the official code), sigmoid (0..1)"),
    flag("--head-lr-mult", positive(float), 20.0, "the mixing head learns this much faster"),
    flag("--no-control-arm", SWITCH, True, "skip the thinking arm trained without REINFORCE "
         "(its weight 0) beside the others", dest="control_arm"),
    flag("--eval-every", positive(int), (60, 100, 200), "steps between evaluations (metrics rows)"),
]
DEFAULTS = presets(FLAGS)
META = [SOT, EOTH]
NOT_THOUGHT = (SOT, EOTH, EOT, PAD)  # never sampled as a thought token

# -----------------------------------------------------------------------------
# The text (tasks/text.py: lines that show their work or not, packed into rows)


def check_data(args, task, problems):
    """train.py's check of what this method will read: every problem's line fits a sequence."""
    for p in problems:
        text = line(task, p, worked=True)  # the longer of its two lines
        if len(encode(text)) > args.seq_len + 1:
            raise ValueError(f"argument --seq-len: the line {text.strip()!r} is longer than "
                             f"{args.seq_len} + 1 tokens; raise --seq-len or draw smaller numbers")


def train_problems(task, args, step, test_keys):
    """More fresh problems than a batch of rows holds (a line is >= 6 tokens), from a seed
    derived from the step (a resumed run sees the same batches); no test problem among them."""
    n = args.batch_size * ((args.seq_len + 1) // 6 + 1)
    return sample_problems(task, n, args.train_difficulty, seed_for(args.seed, "batch", step),
                           exclude=test_keys)


def train_batch(task, args, step, test_keys):
    """batch_size rows of packed training lines."""
    problems = train_problems(task, args, step, test_keys)
    worked = show_work(len(problems), args.worked_fraction, seed_for(args.seed, "batch", step))
    seqs, _ = pack(task, problems, worked, args.seq_len)
    return seqs[:args.batch_size]


def text_logits(logits, banned=META):
    """Float logits with the banned tokens at -inf. The meta-tokens are not text, so they get no
    probability (they start as copies of "(" and ")", whose mass they would otherwise share)."""
    logits = logits.float().clone()
    logits[..., list(banned)] = float("-inf")
    return logits


def targets(seqs):
    """Next-token targets of seqs[:, :-1], with padding ignored (-1)."""
    return seqs[:, 1:].masked_fill(seqs[:, 1:] == PAD, -1)


def talk_columns(seqs, at, n_true):
    """Talk token j after the thought at position at[i] mixes with the base hidden state at
    column at[i] + j (N, n_true) and predicts seqs there + 1 (B, N, n_true; -1 past the end)."""
    T = seqs.size(1) - 1
    col = at[:, None] + torch.arange(n_true, device=at.device)[None]
    return col, targets(seqs)[:, col.clamp(max=T - 1)].masked_fill(col >= T, -1)


def target_logp(logits, y):
    """log p(y) under the next-text-token distribution of logits (..., V); 0 where y = -1."""
    logp = F.log_softmax(text_logits(logits), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return logp * (y >= 0)

# -----------------------------------------------------------------------------
# Thinking: meta-tokens, the mixing head, the thought mask and tokens; think() in parallel and
# think_naive() one position at a time (the reference)


def init_meta_tokens(model, how="dash"):
    """Start and end of thought start both as the pause "-" (how="dash": the paper's "---" in a
    character vocabulary), or as "(" and ")", the brackets of the work (how="paren")."""
    start, end = "()" if how == "paren" else "--"
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[SOT] = wte[encode(start)[0]]
        wte[EOTH] = wte[encode(end)[0]]


class MixingHead(nn.Module):
    """w = bound(MLP([h_base, h_thought])); mixed = (1 - w) h_base + w h_thought, before the LM
    head; the last layer starts at zero, so w = 0 (the base model). bound: "tanh", w in (-1, 1),
    near 0 the official code's head; "linear", that head; "sigmoid", w in (0, 1), from w0."""

    def __init__(self, n_embd, bound="tanh", w0=0.01):
        super().__init__()
        if bound not in ("tanh", "linear", "sigmoid"):
            raise ValueError(f"unknown mixing bound {bound!r}; choose tanh, linear or sigmoid")
        self.bound = bound
        self.mlp = nn.Sequential(nn.Linear(2 * n_embd, n_embd), nn.ReLU(),
                                 nn.Linear(n_embd, n_embd), nn.ReLU(), nn.Linear(n_embd, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.constant_(self.mlp[-1].bias, math.log(w0 / (1 - w0)) if bound == "sigmoid" else 0)

    def forward(self, h_base, h_thought):
        z = self.mlp(torch.cat([h_base, h_thought], dim=-1))  # (..., 1)
        w = {"tanh": torch.tanh, "linear": lambda x: x, "sigmoid": torch.sigmoid}[self.bound](z)
        return (1 - w) * h_base + w * h_thought, w.squeeze(-1)  # mixed, w


class FixedHead(nn.Module):
    """The diagnostic's head: one weight w everywhere (w = 0: the base model alone; w = 1: the
    prediction after the thought alone). No parameters, so it draws nothing from the RNG."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, h_base, h_thought):
        return (1 - self.w) * h_base + self.w * h_thought, torch.full_like(h_base[..., 0], self.w)


def thought_mask(T, at, k):
    """Attention mask (1, 1, N, T + N*k) of pass k >= 1 (the official code's diagonal mask): the
    cache holds T real columns, then N per earlier pass m; thought i (at position at[i]) sees the
    real columns 0..at[i] and its own column T + N*m + i of every pass."""
    real = torch.arange(T, device=at.device)[None, :] <= at[:, None]  # (N, T)
    own = torch.eye(len(at), dtype=torch.bool, device=at.device).repeat(1, k)  # (N, N*k)
    return torch.cat([real, own], dim=1)[None, None]


def thought_token(logits, temperature, generator, rows=None):
    """(token, log-prob) per row of logits (..., V), the meta-tokens banned (greedy at temperature
    0). REINFORCE's log-prob is at the sampling temperature (1 when greedy; the official code: 3).
    rows = (index, n): these are those rows of a batch of n, with the whole batch's noise."""
    logits = text_logits(logits, NOT_THOUGHT)
    index, n = rows or (slice(None), len(logits))
    u = torch.rand(n, *logits.shape[1:], generator=generator, device=logits.device)[index] \
        if temperature > 0 else None
    tok = sample_token(logits, temperature, u=u)
    logp = F.log_softmax(logits / (temperature or 1.0), dim=-1)
    return tok, logp.gather(-1, tok[..., None]).squeeze(-1)


def think(model, head, seqs, at, thought_len, n_true, n_thoughts=1, temperature=1.0,
          generator=None, rows=None):
    """Thoughts after the positions `at` of every row of seqs (B, T+1), all at once, each followed
    by n_true talk tokens. Returns a dict, row b*n_thoughts + j for the j-th thought of row b:
    base_logits (B, T, V); thoughts, thought_logp (B*n, N, thought_len); mixed_logits (B*n, N,
    n_true, V) predicting talk_targets (B, N, n_true); w (B*n, N, n_true); pass_logits (tests)."""
    # 1) pass 0 reads x = seqs[:, :T] into the cache, then repeated for each row's n_thoughts
    B, T = seqs.size(0), seqs.size(1) - 1
    cache = ConcatCache(model.config.n_layer)
    base_logits, h0 = model(seqs[:, :T], cache=cache, return_hidden=True)  # (B, T, V), (B, T, C)
    cache.repeat_rows(n_thoughts)
    h0 = h0.repeat_interleave(n_thoughts, 0)  # (B*n, T, C)
    n_think = len(at)  # N in the shapes
    col, talk_targets = talk_columns(seqs, at, n_true)  # (N, n_true), (B, N, n_true)
    talk_inputs = seqs[:, (col + 1).clamp(max=T)]  # (B, N, n_true): x[at+j+1], forced after j
    # 2) a pass (N cache columns) per start of thought, thought token, end of thought, talk token
    inp = torch.full((B * n_thoughts, n_think), SOT, dtype=torch.long, device=seqs.device)
    thoughts, thought_logp, mixed, ws, pass_logits = [], [], [], [], []
    for k in range(1, thought_len + n_true + 2):
        logits, h = model(inp, pos=at + k, mask=thought_mask(T, at, k), cache=cache,
                          return_hidden=True)  # (B*n, N, V), (B*n, N, C)
        pass_logits.append(logits)
        if k <= thought_len:  # this pass predicts thought token k: sample it
            inp, lp = thought_token(logits, temperature, generator, rows)
            thoughts.append(inp), thought_logp.append(lp)
        elif k == thought_len + 1:  # the end of thought is forced, never sampled
            inp = torch.full_like(inp, EOTH)
        else:  # talk token j: mix with the base hidden state at t + j, then force x[t+j+1]
            j = k - thought_len - 2
            hb = h0[:, col[:, j].clamp(max=T - 1)]  # (B*n, N, C)
            m, w = head(hb, h)
            mixed.append(model.lm_head(m)), ws.append(w)
            inp = talk_inputs[:, :, j].repeat_interleave(n_thoughts, 0)
    # 3) each pass's outputs stacked along a last dimension (none when thought_len = 0)
    empty = torch.zeros(B * n_thoughts, n_think, 0, device=seqs.device)
    return dict(base_logits=base_logits, talk_targets=talk_targets, pass_logits=pass_logits,
                thoughts=torch.stack(thoughts, -1) if thoughts else empty.long(),
                thought_logp=torch.stack(thought_logp, -1) if thoughts else empty,
                mixed_logits=torch.stack(mixed, 2), w=torch.stack(ws, -1))


@torch.no_grad()
def think_naive(model, head, prefix, thought_len, future=(), temperature=0.0, generator=None):
    """think() for one position, recomputed from scratch for every token (no cache, no mask), for
    the tests; future: the n_true - 1 true tokens to teacher-force after the prefix. Returns
    (thought, thought_logp, mixed_logits (n_true, V), w (n_true,))."""
    dev = next(model.parameters()).device
    seq = list(prefix) + [SOT]
    thought, logps = [], []
    for _ in range(thought_len):
        tok, lp = thought_token(model(torch.tensor([seq], device=dev))[0, -1], temperature,
                                generator)
        thought.append(int(tok)), logps.append(float(lp))
        seq.append(int(tok))
    talk = seq + [EOTH] + list(future)
    h_thought = model(torch.tensor([talk], device=dev), return_hidden=True)[1][0, -1 - len(future):]
    plain = list(prefix) + list(future)
    h_base = model(torch.tensor([plain], device=dev), return_hidden=True)[1][0, len(prefix) - 1:]
    m, w = head(h_base, h_thought)
    return thought, logps, model.lm_head(m), w


# -----------------------------------------------------------------------------
# The loss (the paper's equation for the REINFORCE gradient, and the two language-model terms)


def quiet_star_loss(th, seqs, n_thoughts, args, counts=None):
    """(loss, stats): w_base * base NLL + w_mixed * mixed NLL + beta * REINFORCE. The three means
    divide by counts when given (torchrun: seqs is a share of a batch; see quiet_star_step)."""
    # 1) the language-model terms: every next token (base), the talk tokens after a thought (mixed)
    y = targets(seqs)
    V = th["base_logits"].size(-1)
    tgt = th["talk_targets"].repeat_interleave(n_thoughts, 0)  # (B*n, N, n_true)
    logp, valid = target_logp(th["mixed_logits"], tgt), tgt >= 0  # log p(talk target), or 0
    has = valid[..., 0].float()  # positions with at least one true token to predict
    n_y, n_talk, n_has = counts or ((y >= 0).sum(), valid.sum().clamp(min=1),
                                    has.sum().clamp(min=1))
    nll_base = F.cross_entropy(text_logits(th["base_logits"]).reshape(-1, V), y.reshape(-1),
                               ignore_index=-1, reduction="sum") / n_y
    nll_mixed = -logp.sum() / n_talk
    # 2) REINFORCE, rewarding the true text's log-likelihood with a thought over the mean at its
    # position: only better-than-average thoughts are pushed up, and only their sampled tokens
    r = logp.detach().sum(-1).view(-1, n_thoughts, logp.size(1))  # (B, n, N)
    adv = (r - r.mean(1, keepdim=True)).clamp(min=0).view(-1, logp.size(1))  # (B*n, N)
    reinforce = -(adv * th["thought_logp"].sum(-1) * has).sum() / n_has
    # 3) the weighted sum, and the terms to log
    loss = args.base_weight * nll_base + args.mixed_weight * nll_mixed + \
        args.reinforce_weight * reinforce
    return loss, {"nll_base": nll_base.item(), "nll_mixed": nll_mixed.item(),
                  "reward": (adv * has).sum().item() / float(n_has)}

# -----------------------------------------------------------------------------
# Evaluation: NLL of the answer tokens and greedy answer accuracy, with and without thoughts


@torch.no_grad()
def evaluate_answers(model, head, data, args, batch_size=64):
    """Answer tokens of the bare lines in data (pack's output) under the plain model (head=None) or
    greedy thoughts everywhere (n_true=1: greedy accuracy is read from teacher-forced argmaxes).
    Returns answer_nll, accuracy, line_nll, line_right (per line), with a head mixing_weight."""
    # 1) this process's batches (torchrun: every world-th): log p and rightness of every target
    (seqs_all, ans_all), device = data, next(model.parameters()).device
    (rank, world), mine = rank_world(), {}
    for s in range(rank * batch_size, len(seqs_all), world * batch_size):
        seqs = seqs_all[s:s + batch_size].to(device)
        y = targets(seqs)  # (B, T)
        with autocast(str(device)):
            if head is None:
                logits = model(seqs[:, :-1])
            else:
                th = think(model, head, seqs, torch.arange(y.size(1), device=device),
                           args.thought_len, 1, temperature=0.0)
                logits = th["mixed_logits"][:, :, 0]  # (B, T, V)
        mine[s] = (target_logp(logits, y).cpu(), (text_logits(logits).argmax(-1) != y).cpu(),
                   None if head is None else th["w"][:, :, 0].float().cpu())
    # 2) every batch in order; per line, the NLL of its answer tokens, right if all of them are
    batches = {s: b for share in all_gather(mine) for s, b in share.items()}
    logps, wrongs, ws = zip(*(batches[s] for s in sorted(batches)))
    ans = ans_all[:, 1:]
    hard = ans >= 0
    _, line_of = ans[hard].unique(return_inverse=True)  # each hard token's line, in line order
    n = int(line_of.max()) + 1
    nll = torch.zeros(n, dtype=torch.float64)
    nll.index_add_(0, line_of, -torch.cat(logps)[hard].double())
    right = torch.ones(n, dtype=torch.bool)
    right[line_of[torch.cat(wrongs)[hard]]] = False
    res = {"answer_nll": nll.sum().item() / int(hard.sum()),
           "accuracy": right.float().mean().item(),
           "line_nll": [round(x, 5) for x in nll.tolist()],
           "line_right": [int(x) for x in right.tolist()]}
    if head is not None:
        res["mixing_weight"] = torch.cat(ws)[hard].double().mean().item()
    return res


def paired_change(quiet, plain):
    """The change from the plain arm to the thinking one on the same lines, with 95% bootstrap
    intervals: answer NLL in percent of the plain arm's, and accuracy in points."""
    d_nll = [a - b for a, b in zip(quiet["line_nll"], plain["line_nll"])]
    scale = 100 / (sum(plain["line_nll"]) / len(plain["line_nll"]))
    d_acc = [a - b for a, b in zip(quiet["line_right"], plain["line_right"])]
    return {"nll_pct": scale * sum(d_nll) / len(d_nll),
            "nll_pct_ci": [scale * x for x in bootstrap_ci(d_nll)],
            "acc": sum(d_acc) / len(d_acc), "acc_ci": list(bootstrap_ci(d_acc))}


@torch.no_grad()
def thought_samples(model, head, task, problems, thought_len, k=6):
    """Text to read for a few bare held-out lines: before each answer token, the greedy thought,
    the mixing weight and the token then predicted (teacher-forced, as evaluate reads accuracy)."""
    device = next(model.parameters()).device
    lines = []
    for p in problems[:k]:
        # 1) the greedy thought before each answer token, and the token predicted after it
        text = line(task, p, worked=False)
        ids = encode(text)
        n_q = len(p.question) + 1  # "a+b=": the answer starts after it
        at = torch.arange(n_q - 1, n_q - 1 + len(p.answer), device=device)  # its predictors
        th = think(model, head, torch.tensor([ids], device=device), at, thought_len, 1,
                   temperature=0.0)
        pred = text_logits(th["mixed_logits"][0, :, 0]).argmax(-1).tolist()
        # 2) the line and its verdict, then one line per answer token
        verdict = "right" if pred == ids[n_q:n_q + len(p.answer)] else "wrong"
        lines.append(f"{text.strip()}   [{verdict}: predicted {decode(pred)!r}; "
                     f"the work: {scratch(task, p)}]")
        for i, t in enumerate(at.tolist()):
            lines.append(f"    after {decode(ids[:t + 1])!r}: thought "
                         f"{decode(th['thoughts'][0, i].tolist())!r} "
                         f"(w={float(th['w'][0, i, 0]):+.3f}) -> {decode([pred[i]])!r}")
    return "\n".join(lines) + "\n"

# -----------------------------------------------------------------------------
# Training: the base model, then Quiet-STaR and the plain arm side by side (same data, steps)


def gradient_step(opt, loss, lr, params):
    """loss.backward(), then optimizer_step with each group at lr x its lr_mult (head: faster)."""
    loss.backward()
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    optimizer_step(opt, params, clip=1.0)


def lm_step(model, opt, seqs, lr):
    """A next-token step on the batch seqs; returns this process's loss. Under torchrun (model in
    DDP) on its rows, as common.split_batch splits (counted without a sync): the batch's
    gradient."""
    rank, world = rank_world()
    share = seqs[rank::world]
    with autocast(str(seqs.device)):
        logits = model(share[:, :-1])
    loss = F.cross_entropy(text_logits(logits).reshape(-1, logits.size(-1)),
                           targets(share).reshape(-1), ignore_index=-1,
                           reduction="sum") / ((targets(seqs) >= 0).sum() / world)
    gradient_step(opt, loss, lr, model.parameters())
    return loss.item()


def move_meta_tokens(wte, before, median_norm, mult, max_change):
    """The meta-token rows move mult times as far as Adam moved them from `before` (the official
    code divides them by 100 instead), each at most max_change x the median row norm (inf)."""
    with torch.no_grad():
        step = mult * (wte[META] - before)
        step *= (max_change * median_norm / step.norm(dim=1, keepdim=True)).clamp(max=1.0)
        wte[META] = before + step


class Thinker(nn.Module):
    """think() with the model and the mixing head as one module, so that DistributedDataParallel
    can wrap it (torchrun): one forward (all of think's passes) and one backward per step."""

    def __init__(self, model, head):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, *args, **kwargs):
        return think(self.model, self.head, *args, **kwargs)


def quiet_star_step(model, head, opt, seqs, lr, step, args, thinker=None):
    """One step on the batch seqs; returns quiet_star_loss's stats. Under torchrun through thinker
    (a DDP-wrapped Thinker) on this process's rows, with the whole batch's noise: its step."""
    (rank, world), n, dev = rank_world(), args.n_thoughts, seqs.device
    generator = torch.Generator(device=dev).manual_seed(seed_for(args.seed, "thoughts", step))
    # 1) think: with a stride k, step s at positions s % k, s % k + k, ... (each one in turn)
    at = torch.arange(step % args.think_stride, args.seq_len, args.think_stride, device=dev)
    rows = (torch.arange(rank, len(seqs), world, device=dev)[:, None] * n +
            torch.arange(n, device=dev)).flatten()  # this process's thoughts, of len(seqs) * n
    with autocast(str(dev)):
        th = (thinker or Thinker(model, head))(seqs[rank::world], at, args.thought_len,
                                               args.n_true, n, args.thought_temperature,
                                               generator, (rows, len(seqs) * n))
    # 2) the loss, over the whole batch's counts: targets, talk targets, thoughts with a target
    talk = talk_columns(seqs, at, args.n_true)[1] >= 0  # (B, N, n_true)
    counts = [(targets(seqs) >= 0).sum() / world, (n * talk.sum()).clamp(min=1) / world,
              (n * talk[..., 0].sum()).clamp(min=1) / world]
    loss, stats = quiet_star_loss(th, seqs[rank::world], n, args, counts)
    # 3) the update, then the meta-tokens moved meta_lr_mult times as far (capped)
    wte = model.transformer.wte.weight
    before, median_norm = wte[META].detach().clone(), wte.detach().norm(dim=1).median()
    gradient_step(opt, loss, lr, list(model.parameters()) + list(head.parameters()))
    move_meta_tokens(wte, before, median_norm, args.meta_lr_mult, args.meta_max_change)
    return stats


def base_stage(args, task, cfg, data, test_keys, path, out, device):
    """Stage 1: the base language model, saved, and its "base" row committed (returns nothing)."""
    # 1) the base on the text, from scratch
    t0 = time.time()
    torch.manual_seed(args.seed)
    base = GPT(cfg).to(device)
    opt, forward = base.configure_optimizer(args.lr), wrap_ddp(base)  # torchrun: DDP
    bar = tqdm(range(args.base_steps), desc="base LM", leave=False, dynamic_ncols=True)
    for s in bar:
        loss = lm_step(forward, opt, train_batch(task, args, -1 - s, test_keys).to(device),
                       lr_at(s, args.base_steps, args.lr, warmup=100))
        if s % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    base.eval()
    save_checkpoint(path("base", 0), base, TOKENIZER)
    # 2) the diagnostic: its own greedy thoughts mixed in at w = 0 and w = 1 (can they help?)
    quiet = copy.deepcopy(base)
    init_meta_tokens(quiet, args.meta_init)
    row = {"kind": "base", "step": 0, "base_steps": args.base_steps,
           "plain": evaluate_answers(base, None, data, args),
           "w=0": evaluate_answers(quiet, FixedHead(0.0), data, args),
           "w=1": evaluate_answers(quiet, FixedHead(1.0), data, args)}
    commit(out, t0, row)
    tqdm.write(diagnostic(row))


ARMS = ("plain", "quiet", "no_reinforce")  # stage 2's arms, in the order they step


def load_arms(args, cfg, path, start, device):
    """Stage 2's arms, name -> (model, mixing head or None, optimiser): the plain continuation,
    the thinking arm and (--control-arm) a thinking arm without REINFORCE from the same head; a
    head learns head_lr_mult x faster. From the base at start 0, else as committed then."""
    arms = {}
    for name in ARMS if args.control_arm else ARMS[:2]:
        model, ck = load_checkpoint(path("base" if start == 0 else name, start), device)
        opt, head = model.configure_optimizer(args.continue_lr), None
        if name != "plain":
            head = copy.deepcopy(arms["quiet"][1]) if name != "quiet" else \
                MixingHead(cfg.n_embd, args.mixing).to(device)
            opt.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0,
                                 "lr_mult": args.head_lr_mult})
            if start == 0:
                init_meta_tokens(model, args.meta_init)
        if start > 0:
            opt.load_state_dict(ck["extra"]["opt"])
            if head is not None:
                head.load_state_dict(ck["extra"]["head"])
        arms[name] = (model, head, opt)
    return arms


def save_arms(arms, path, step, task, bare, args, out):
    """Every arm's checkpoint at step (a step in the name: one written just before an
    interruption is never taken as committed), and a few of the thinking arm's thoughts."""
    for name, (model, head, opt) in arms.items():
        extra = {"opt": opt.state_dict()} | ({} if head is None else {"head": head.state_dict()})
        save_checkpoint(path(name, step), model, TOKENIZER, extra=extra)
    write_atomic(os.path.join(out, f"samples_step{step}.txt"),
                 thought_samples(*arms["quiet"][:2], task, bare, args.thought_len))


def evaluate_arms(arms, data, args, step, stats, base_w1):
    """The "eval" row at step: every arm, the plain arm's own greedy thoughts at a fixed w = 1
    (its meta-tokens as they start), the thinking arm's paired change over each of them and over
    the base's fixed w = 1 thoughts, and its mean training stats since the last row."""
    shares = all_gather({k: sum(d[k] for d in stats) / len(stats) for k in stats[0]})
    mean = {k: sum(m[k] for m in shares) / len(shares) for k in shares[0]}  # over processes
    row = {"kind": "eval", "step": step, "tokens_seen": step * args.batch_size * args.seq_len,
           "train": mean}
    for name, (model, head, _) in arms.items():
        row[name] = evaluate_answers(model, head, data, args)
    own = copy.deepcopy(arms["plain"][0])
    init_meta_tokens(own, args.meta_init)
    row["plain_w1"] = evaluate_answers(own, FixedHead(1.0), data, args)
    for key, other in (("change", "plain"), ("vs_plain_w1", "plain_w1"),
                       ("vs_no_reinforce", "no_reinforce")):
        if other in row:
            row[key] = paired_change(row["quiet"], row[other])
    row["vs_fixed"] = paired_change(row["quiet"], base_w1)
    return row


def think_training(args, task, arms, data, bare, test_keys, path, out, start):
    """Stage 2 from step start, every arm on the same batches and rates; returns nothing."""
    # 1) the arms in training mode (DDP under torchrun), REINFORCE's weight per arm, and the
    # base's fixed w = 1 measures
    device = next(arms["plain"][0].parameters()).device
    forward = {}
    for name, (model, head, _) in arms.items():
        model.train()
        forward[name] = wrap_ddp(model if head is None else Thinker(model, head))  # torchrun: DDP
    loss_args = {"quiet": args,
                 "no_reinforce": argparse.Namespace(**{**vars(args), "reinforce_weight": 0.0})}
    metrics = os.path.join(out, "metrics.jsonl")
    base_w1 = next(r for r in read_jsonl(metrics) if r["kind"] == "base")["w=1"]
    t0, stats, prev = time.time(), [], start  # prev: the step of the newest committed models
    bar = tqdm(range(start, args.think_steps), desc="Quiet-STaR", leave=False, dynamic_ncols=True)
    for s in bar:
        # 2) a step of each arm on this batch, at this learning rate (the thinking arm's stats)
        seqs = train_batch(task, args, s, test_keys).to(device)
        lr = lr_at(s, args.think_steps, args.continue_lr, warmup=args.think_steps // 10 + 1)
        for name, (model, head, opt) in arms.items():
            if head is None:
                lm_step(forward[name], opt, seqs, lr)
                continue
            st = quiet_star_step(model, head, opt, seqs, lr, s, loss_args[name], forward[name])
            if name == "quiet":
                stats.append(st)
        if s % 5 == 0:
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats[-1].items()})
        if (s + 1) % args.eval_every and s + 1 != args.think_steps:
            continue
        # 3) every eval_every steps and the last: save, commit the "eval" row, drop older models
        for model, _, _ in arms.values():
            model.eval()
        save_arms(arms, path, s + 1, task, bare, args, out)
        commit(out, t0, evaluate_arms(arms, data, args, s + 1, stats, base_w1))
        for name in arms:  # the older models (base's stay)
            if prev > 0 and is_main() and os.path.exists(path(name, prev)):
                os.remove(path(name, prev))
        prev = s + 1
        tqdm.write(table_row(read_jsonl(metrics)[-1]))  # the row just committed
        for model, _, _ in arms.values():
            model.train()
        t0, stats = time.time(), []


def run(args, task, P, D, test, out, device, new_model):
    """Stage 1 (train_base), then stage 2 (think_training), resumed after the last committed row
    when started again on the folder; returns (quiet, head). test: the problems of the held-out
    lines (train.py's test set; every training batch is drawn without them); P, D: unused."""
    # 1) the model (its block holds a sequence and a thought) and the held-out lines, packed
    need = args.seq_len + args.thought_len + args.n_true + 2
    cfg = get_config(args.preset, block_size=max(need, get_config(args.preset).block_size))
    test_keys = held_out(task, test)
    worked = show_work(len(test), args.worked_fraction, seed_for(args.seed, "test work"))
    data = pack(task, test, worked, args.seq_len)
    bare = [p for p, w in zip(test, worked) if not w]  # the lines measured
    path = lambda arm, step: os.path.join(out, f"{arm}_step{step}.pt")  # noqa: E731
    # 2) stage 1 unless committed, then stage 2 from the last committed step
    if not committed(out, "step", kind="base"):
        base_stage(args, task, cfg, data, test_keys, path, out, device)
    start = max(committed(out, "step", kind="eval"), default=0)
    if start > 0:
        tqdm.write(f"resuming {out} after step {start}")
    arms = load_arms(args, cfg, path, start, device)
    think_training(args, task, arms, data, bare, test_keys, path, out, start)
    return arms["quiet"][:2]  # quiet, head

# -----------------------------------------------------------------------------
# Report: the plot of both measures over training, and the table


def diagnostic(base):
    """The base row's line: can this base's own thoughts help it at all?"""
    w0, w1 = base["w=0"], base["w=1"]
    return (f"Diagnostic, before training ({len(w0['line_nll'])} bare held-out lines): answer "
            f"NLL {w0['answer_nll']:.3f} at w = 0 (the base), {w1['answer_nll']:.3f} at w = 1 "
            f"(after its own thought alone); accuracy {w0['accuracy']:.3f} and "
            f"{w1['accuracy']:.3f}.")


TABLE_HEAD = ("| step | acc, thinking | acc, plain arm | acc, plain arm's own thoughts (w = 1) | "
              "acc, no REINFORCE | thinking - plain's own thoughts (95% CI) | thinking - no "
              "REINFORCE (95% CI) | thinking - plain arm (95% CI) | answer NLL, thinking - plain "
              "arm (95% CI) | mixing w, thinking / no REINFORCE | wall s |\n" + "|---" * 11 + "|")


def table_row(r):
    """An "eval" row as a line of the table under TABLE_HEAD ("-" where a run has no such arm)."""
    def cell(key, field, fmt):
        return format(r[key][field], fmt) if key in r else "-"
    acc = lambda key: cell(key, "accuracy", ".3f")  # noqa: E731
    diff = lambda key: with_ci(r[key]["acc"], r[key]["acc_ci"]) if key in r else "-"  # noqa: E731
    w = lambda key: cell(key, "mixing_weight", "+.3f")  # noqa: E731
    c = r["change"]
    return (f"| {r['step']} | {acc('quiet')} | {acc('plain')} | {acc('plain_w1')} | "
            f"{acc('no_reinforce')} | {diff('vs_plain_w1')} | {diff('vs_no_reinforce')} | "
            f"{diff('change')} | {c['nll_pct']:+.1f}% ({c['nll_pct_ci'][0]:+.1f} to "
            f"{c['nll_pct_ci'][1]:+.1f}) | {w('quiet')} / {w('no_reinforce')} | {r['wall_s']} |")


def report(args, rows):
    """Draws accuracy.png (every arm's measures over training); returns the diagnostic and the
    table."""
    # 1) each arm's measures at step 0 (the base: its w = 0, or its thoughts at w = 1 for the
    # plain arm's own thoughts) and at every "eval" row
    base = next(r for r in rows if r["kind"] == "base")
    evals = sorted((r for r in rows if r["kind"] == "eval"), key=lambda r: r["step"])
    steps = [0] + [r["step"] for r in evals]
    arms = [("quiet", "w=0", "o", f"Quiet-STaR ({args.thought_len}-token thoughts)"),
            ("no_reinforce", "w=0", "^", "thinking arm without REINFORCE"),
            ("plain", "plain", "s", "plain arm: base continued, no thoughts (same data and steps)"),
            ("plain_w1", "w=1", "x", "plain arm's own greedy thoughts, fixed w = 1")]
    # 2) a panel each: answer NLL, accuracy, the mixing weight (the heads)
    with figure(os.path.join(args.out, "accuracy.png"), ncols=3, figsize=(15, 4)) as (fig, axes):
        for ax, key, label in zip(axes, ("answer_nll", "accuracy", "mixing_weight"),
                                  ("answer-token NLL (nats)", "greedy answer accuracy",
                                   "mixing weight w at the answer tokens")):
            for i, (arm, at0, marker, name) in enumerate(arms):
                has_w = key != "mixing_weight" or not arm.startswith("plain")
                if has_w and all(arm in r for r in evals):
                    ax.plot(steps, [base[at0][key]] + [r[arm][key] for r in evals],
                            marker=marker, color=f"C{i}", label=name)
            ax.set(xlabel="steps after the base model", ylabel=label)
            ax.grid(alpha=0.3)
        axes[1].set_ylim(0, 1.02)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Quiet-STaR on {args.task} text (answers of held-out lines that do not show "
                     "their work)")
    return "\n".join([diagnostic(base), "", TABLE_HEAD] + [table_row(r) for r in evals])
