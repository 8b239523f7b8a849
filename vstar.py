"""
V-STaR: keep the wrong solutions too, and train a verifier on them with DPO.

Hosseini et al. 2024, "V-STaR: Training Verifiers for Self-Taught Reasoners" (arXiv 2402.06457),
Algorithm 1:

    D_GEN <- P (gold);  G_SFT <- SFT(base, D_GEN)
    for n = 1..T:
        S <- k samples per problem of P and D from the current generator, labelled right/wrong
        D_GEN <- D_GEN + the right ones;   D_VER <- D_VER + all of them
        G_n <- SFT(base, D_GEN)                       (restart from the base every iteration)
    V <- DPO(init = G_SFT, reference = G_SFT, pairs (right, wrong) of a problem in D_VER)
    test time: sample k candidates from G_T, answer with the one V scores highest.

Run: python train.py --method vstar          (countdown by default)

Every verifier scores the same n test samples per problem; best-of-k, majority@k and pass@k
(the ceiling) are exact estimates over k-subsets. What each learns from:
- outcome labels (right/wrong samples of D_VER): DPO (the paper's; and on shared-prefix pairs,
  each wrong sample against the right one nearest it: pairs_of), an ORM (a scalar head,
  BCE) and GenRM (Zhang et al. 2024, arXiv 2408.15240: p("Y") after "Is the answer correct?");
- the program's per-step labels (every step's arithmetic recomputed by the task): GenRM-CoT
  (same paper; a verification rationale before the verdict), and the same labels given to a
  scalar head ("prm on program labels"), which separates format from supervision. Around the
  learned arithmetic a rule (task.rules_ok, named as such) judges the bookkeeping;
- nothing: the generator's own mean token log-prob, the shortest first, random order; and the
  exact check, an oracle. Compute is every token a network processes (compute_per_sample).

Departures: the base is a fresh seeded GPT; samples come from G_(n-1) and G_n is trained after
them; DPO's loss adds the right solutions' NLL (RPO, Pang et al. 2024; --dpo-nll 0 is plain
DPO); "dpo" sums log V(y|x), "dpo-mean" averages it per token (the paper does not say which).
"""

import math
import os
import random
import time
from itertools import product

import torch
import torch.nn.functional as F
from tqdm import tqdm

import star
from model import (ScalarHead, all_gather, append_jsonl, autocast, bootstrap_ci, figure,
                   load_checkpoint, rank_world, read_jsonl, save_checkpoint, seed_for,
                   sequence_logprobs, split_batch, train_bce, wrap_ddp, write_jsonl)
from tasks import EOT, NEWLINE, PAD, TOKENIZER, decode, encode

# Every setting of a run, per preset (train.py fills the flags left unset from here, and refuses
# the others). A whole training set of gold solutions (a P of 300 was memorised); countdown,
# where checking is easier than finding; one iteration (more did not move the generator).
_SHARED = dict(task="countdown", n_train=2000, samples=8, temperature=0.7, beta=0.1,
               dpo_nll=1.0, verifier_lr=3e-4, checkpoint=None, compile=False)
DEFAULTS = {
    "tiny": dict(_SHARED, n_unlabeled=600, n_test=300, steps=1000, batch_size=32, lr=2e-3,
                 sample_batch_size=300, iterations=1, verifier_steps=200, eval_samples=16),
    "small": dict(_SHARED, n_unlabeled=2000, n_test=500, steps=3000, batch_size=64, lr=1e-3,
                  sample_batch_size=500, iterations=3, verifier_steps=1000, eval_samples=32),
    "gpu": dict(_SHARED, n_unlabeled=10000, n_test=2000, steps=3000, batch_size=256, lr=1e-3,
                sample_batch_size=2048, iterations=3, verifier_steps=2000, eval_samples=64),
}

# -----------------------------------------------------------------------------
# Unbiased estimators over n samples of one problem


def pass_at_k(n, c, k):
    """P(at least one of k samples drawn without replacement from n, c right, is right).
    Chen et al. 2021: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def best_of_k(scores, correct, k):
    """P(the top-scored of k samples drawn without replacement from n is right).

    Sorted by score, highest first, with rightness a_0..a_(n-1): sum_i C(n-i-1, k-1) a_i / C(n, k)
    (V-STaR, section 4). Ties: the verifier picks uniformly among tied top candidates, which is
    exactly the same formula with each a_i replaced by the mean rightness of its tie group.
    """
    n = len(scores)
    order = sorted(range(n), key=lambda i: -scores[i])
    a = [float(correct[i]) for i in order]
    i = 0
    while i < n:  # average rightness within each group of equal scores
        j = i
        while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mean = sum(a[i:j + 1]) / (j + 1 - i)
        a[i:j + 1] = [mean] * (j + 1 - i)
        i = j + 1
    return sum(math.comb(n - i - 1, k - 1) * a[i] for i in range(n - k + 1)) / math.comb(n, k)


def majority_at_k(answers, right_answers, k):
    """P(majority vote over k samples drawn without replacement from n is right), exactly.

    answers: the n canonical answers (None = unparsable); right_answers: the set of answers that
    count as right (one number in most tasks; in countdown every right trace is its own answer).
    An unparsable answer never gets a vote; a subset with no parsable answer is wrong. Ties
    between the top answers are broken uniformly at random, so a tie of t answers credits 1/t.
    The credit of a set of answers is the sum of each one's credit, so each is counted alone.
    """
    return sum(_majority_credit(answers, a, k) for a in set(right_answers) if a is not None)


def right_answers(answers, right):
    """The answers that count as right in one problem's pool: those of its right samples."""
    return {a for a, ok in zip(answers, right) if ok}


def _majority_credit(answers, right_answer, k):
    """majority_at_k for one answer, over all k-subsets by dynamic programming over answer
    groups: for every j (votes for right_answer), count the ways the other groups stay below j,
    or tie at exactly j (tracking how many tie)."""
    n = len(answers)
    groups = {}
    for a in answers:
        if a is not None:
            groups[a] = groups.get(a, 0) + 1
    c = groups.pop(right_answer, 0)
    n_none = n - c - sum(groups.values())
    others = list(groups.values())
    total = 0.0
    for j in range(1, min(c, k) + 1):
        # ways[m][t]: choose m samples among the other groups, each with < j or == j votes,
        # t of them with exactly j
        ways = [[0] * (len(others) + 1) for _ in range(k + 1)]
        ways[0][0] = 1
        for g in others:
            new = [[0] * (len(others) + 1) for _ in range(k + 1)]
            for m in range(k + 1):
                for t in range(len(others) + 1):
                    if ways[m][t] == 0:
                        continue
                    for x in range(0, min(g, j) + 1):
                        if m + x <= k:
                            new[m + x][t + (x == j)] += ways[m][t] * math.comb(g, x)
            ways = new
        for m in range(k - j + 1):
            rest = k - j - m  # filled with unparsable samples, which do not vote
            if rest > n_none:
                continue
            for t in range(len(others) + 1):
                if ways[m][t]:
                    total += math.comb(c, j) * ways[m][t] * math.comb(n_none, rest) / (t + 1)
    return total / math.comb(n, k)


# -----------------------------------------------------------------------------
# The DPO loss and the verifiers


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """-log sigmoid(beta * [(log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))]).

    Rafailov et al. 2023, eq. 7, with summed completion log-probs. Returns (mean loss, the
    implicit rewards of chosen and rejected, the share of pairs ranked right)."""
    r_chosen = beta * (pi_chosen - ref_chosen)
    r_rejected = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    return loss, r_chosen.detach(), r_rejected.detach(), (r_chosen > r_rejected).float().mean()


def orm_reads(completion):
    """Where the ORM reads a completion: its last token (the end-of-text)."""
    return [len(completion) - 1]


# GenRM (Zhang et al. 2024): verification as next-token prediction. After a candidate solution
# comes a fixed question, and the verifier's score is p(Yes) as the next token. In this
# character tokenizer the verdicts are the one-character tokens "Y" and "N".
GENRM_QUESTION = "\nIs the answer correct? "
YES, NO = encode("Y")[0], encode("N")[0]


def genrm_input(prompt, completion):
    """What GenRM reads before its verdict: the problem, the solution (without its
    end-of-text) and the question."""
    body = completion[:-1] if completion and completion[-1] == EOT else completion
    return prompt + body + encode(GENRM_QUESTION)


def train_genrm(sft_path, labelled, args, device):
    """GenRM: G_SFT fine-tuned with the next-token loss on the verdict of every labelled sample
    ("Y" after a right one, "N" after a wrong one), the same samples as DPO's and the ORM's,
    mixed with the generator's SFT data (the right ones as solutions: the paper's unified
    training), at the generator's SFT learning rate."""
    model = load_checkpoint(sft_path, device)[0]
    examples = [(genrm_input(p, c), [YES if ok else NO]) for p, c, ok in labelled] + \
        [(p, c) for p, c, ok in labelled if ok]
    star.finetune(model, examples, args.verifier_steps, args.lr,
                  2 * args.batch_size, seed=seed_for(args.seed, "genrm"), desc="GenRM verifier")
    return model.eval()


# GenRM-CoT (same paper): a verification rationale, then Yes or No; p(Yes) averaged over m
# sampled rationales. Here the task writes the rationale it learns from (task.recheck): each step
# recomputed alone ("48+11=" -> "59"), so the claim is never in view to be copied, and Yes iff
# every recomputation equals its claim. As m grows, p(Yes) tends to the product over steps of
# p(claim | operands), which one teacher-forced pass computes exactly: cot_scores.


def recheck_examples(task, labelled):
    """GenRM-CoT's training rows: every step of every labelled sample, right or wrong, alone,
    followed by the result it should have: ("48+11=", "59" + newline)."""
    return [(encode(q), encode(should) + [NEWLINE]) for _, c, _ in labelled
            for q, _, should in task.recheck(decode(c[:-1])) or ()]


def train_genrm_cot(sft_path, task, labelled, args, device):
    """GenRM-CoT: G_SFT fine-tuned with the next-token loss on the task's rationales of the
    same labelled samples, at the generator's SFT learning rate."""
    model = load_checkpoint(sft_path, device)[0]
    star.finetune(model, recheck_examples(task, labelled), args.verifier_steps, args.lr,
                  2 * args.batch_size, seed=seed_for(args.seed, "genrm-cot"),
                  desc="GenRM-CoT verifier")
    return model.eval()


def cot_rows(task, problems, texts, finished=None):
    """What GenRM-CoT reads for each text: one (the step with its result cut off, the claimed
    result + newline) pair of token lists per step, or None where the text cannot score as
    right: task.recheck finds no rationale, or the task's rule (task.rules_ok) rejects the
    bookkeeping around the arithmetic (a finished[i] text, default True, must be a whole
    solution that reaches the target)."""
    finished = [True] * len(texts) if finished is None else finished
    return [None if not task.rules_ok(p, t, fin) or (st := task.recheck(t)) is None else
            [(encode(q), encode(claim) + [NEWLINE]) for q, claim, _ in st]
            for p, t, fin in zip(problems, texts, finished)]


@torch.no_grad()
def cot_scores(verifier, task, problems, texts, finished=None, batch_size=512):
    """GenRM-CoT's p(Yes) for each text: the product over its steps of p(claim + newline | the
    step's operands), 0 where cot_rows gives None. A finished countdown solution always has
    one step fewer than its numbers, so none is favoured for being short."""
    steps = cot_rows(task, problems, texts, finished)
    rows = [row for st in steps for row in st or ()]
    logp = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        with autocast(str(next(verifier.parameters()).device)):
            logp += sequence_logprobs(verifier, [q for q, _ in chunk], [c for _, c in chunk],
                                      PAD).float().tolist()
    logp = iter(logp)
    return [0.0 if st is None else math.exp(sum(next(logp) for _ in st)) for st in steps]


def step_reads(completion):
    """Where the process reward model (model.ScalarHead) reads a completion: the end of every
    step, its newline, and the final end-of-text."""
    return [j for j, t in enumerate(completion) if t in (NEWLINE, EOT)]


def step_prefixes(text):
    """The prefixes of a solution that end after one of its steps (not the whole solution)."""
    lines = text.split("\n")
    return ["".join(line + "\n" for line in lines[:k]) for k in range(1, len(lines))]


def program_step_rows(task, labelled):
    """The format control's training rows: GenRM-CoT's own supervision, each step's arithmetic
    right or wrong as the task's program recomputes it (task.recheck), given to a scalar head
    read at the end of each step. Samples with no rationale are left out."""
    rows = []
    for prompt, c, _ in labelled:
        steps = task.recheck(decode(c[:-1]))
        if steps:
            rows.append((prompt, c, step_reads(c)[:len(steps)],
                         [float(claim == should) for _, claim, should in steps]))
    return rows


@torch.no_grad()
def program_scores(head, task, problems, texts, batch_size=256):
    """The format control's score, aggregated as GenRM-CoT's is: 0 where task.rules_ok rejects
    the text or it has no rationale, else the product over its steps of the head's p(the
    step's arithmetic is right)."""
    out = []
    for i in range(0, len(texts), batch_size):
        ps, ts = problems[i:i + batch_size], texts[i:i + batch_size]
        comps = [encode(t) + [EOT] for t in ts]
        n = [len(task.recheck(t) or ()) if task.rules_ok(p, t) else 0 for p, t in zip(ps, ts)]
        logits, _ = head([encode(task.prompt(p)) for p in ps], comps,
                         [step_reads(c)[:max(1, k)] for c, k in zip(comps, n)])
        logp = F.logsigmoid(logits.float())
        out += [math.exp(logp[b, :k].sum().item()) if k else 0.0 for b, k in enumerate(n)]
    return out


def pairs_of(labelled, nearest=False):
    """(prompt, right completion, wrong completion) for every right x wrong pair of a problem;
    nearest: each wrong one only with the right one that shares its longest prefix, so that the
    pair differs where the wrong solution went wrong (a step-level pair: the shared prefix's
    log-probs cancel in DPO's margin)."""
    by_prompt = {}
    for prompt, completion, ok in labelled:
        by_prompt.setdefault(tuple(prompt), ([], []))[0 if ok else 1].append(completion)
    if not nearest:
        return [(list(p), r, w) for p, (rights, wrongs) in by_prompt.items()
                for r, w in product(rights, wrongs)]
    return [(list(p), max(rights, key=lambda r: shared_prefix(r, w)), w)
            for p, (rights, wrongs) in by_prompt.items() if rights for w in wrongs]


def shared_prefix(a, b):
    """How many leading tokens two sequences share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def train_dpo(sft_path, labelled, args, device, nearest=False):
    """The DPO verifier: starts from G_SFT, reference G_SFT; pairs sampled each step (all of a
    problem's, or the shared-prefix ones: pairs_of); with args.dpo_nll > 0, the NLL of the
    pairs' right solutions is added to the loss (RPO)."""
    pairs = pairs_of(labelled, nearest)
    if not pairs:
        raise ValueError("no (right, wrong) pair of the same problem: DPO has nothing to learn")
    policy = load_checkpoint(sft_path, device)[0].train()
    ref = load_checkpoint(sft_path, device)[0].eval()
    opt = policy.configure_optimizer(args.verifier_lr, weight_decay=0.0)
    forward = wrap_ddp(policy)
    rng = random.Random(seed_for(args.seed, "dpo nearest" if nearest else "dpo"))
    bar = tqdm(range(args.verifier_steps), desc="DPO verifier" + " (shared prefix)" * nearest,
               leave=False, dynamic_ncols=True)
    accs = []
    for step in bar:
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(args.batch_size)]
        share, denom = split_batch(batch)  # torchrun: this process's share
        prompts = [p for p, _, _ in share] * 2
        completions = [r for _, r, _ in share] + [w for _, _, w in share]
        with autocast(str(device)):
            pi = sequence_logprobs(forward, prompts, completions, PAD)  # (2B,)
            with torch.no_grad():
                rf = sequence_logprobs(ref, prompts, completions, PAD)
        B = len(share)
        loss, _, _, acc = dpo_loss(pi[:B], pi[B:], rf[:B], rf[B:], args.beta)
        if args.dpo_nll:  # RPO: also the right solutions' mean token NLL (departure 5)
            lengths = torch.tensor([len(r) for _, r, _ in share], device=pi.device)
            loss = loss + args.dpo_nll * (-pi[:B] / lengths).mean()
        loss = loss * B / denom  # the share's sum over the global mean's divisor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        accs.append(acc.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            pair_acc=f"{sum(accs[-20:]) / len(accs[-20:]):.2f}")
    return policy.eval(), len(pairs)


def train_head(sft_path, rows, args, device, name, desc):
    """A verifier with a scalar head on G_SFT (model.ScalarHead), trained with binary
    cross-entropy on rows (model.train_bce): the ORM, the diagnostic, search's PRM."""
    model = ScalarHead(load_checkpoint(sft_path, device)[0]).to(device)
    return train_bce(model, rows, args.verifier_steps, args.verifier_lr, 2 * args.batch_size,
                     seed=seed_for(args.seed, name), desc=desc)


def train_orm(sft_path, labelled, args, device):
    """The comparison verifier: G_SFT with a scalar head, BCE on the same labelled samples."""
    rows = [(p, c, orm_reads(c), [float(ok)]) for p, c, ok in labelled]
    return train_head(sft_path, rows, args, device, "orm", "ORM verifier")


@torch.no_grad()
def scores(verifier, prompts, completions, kind, batch_size=256):
    """Verifier scores: 'dpo' = log V(y|x) summed, 'dpo-mean' = per completion token, 'orm' =
    the head's logit, 'genrm' = p(Yes). Under torchrun each process scores every world-th
    batch."""
    rank, world = rank_world()
    mine = {}
    for i in range(rank * batch_size, len(prompts), world * batch_size):
        p, c = prompts[i:i + batch_size], completions[i:i + batch_size]
        if kind == "orm":
            mine[i] = verifier(p, c, [orm_reads(x) for x in c])[0][:, 0].float().tolist()
        elif kind == "prm":  # the lowest step score
            logits, mask = verifier(p, c, [step_reads(x) for x in c])
            mine[i] = logits.float().masked_fill(~mask, float("inf")).min(1).values.tolist()
        elif kind == "genrm":  # p(Yes)
            inputs = [genrm_input(a, b) for a, b in zip(p, c)]
            s = sequence_logprobs(verifier, inputs, [[YES]] * len(inputs), PAD)
            mine[i] = s.float().exp().tolist()
        else:
            s = sequence_logprobs(verifier, p, c, PAD).float()
            if kind == "dpo-mean":
                s = s / torch.tensor([len(x) for x in c], device=s.device)
            mine[i] = s.tolist()
    batches = {i: s for share in all_gather(mine) for i, s in share.items()}
    return [x for i in sorted(batches) for x in batches[i]]


# -----------------------------------------------------------------------------
# The generator loop, the verifiers, the evaluation


def label(task, problems, texts):
    """(prompt ids, completion ids + end-of-text, right?) for every sample of every problem."""
    return [(encode(task.prompt(p)), encode(t) + [EOT], task.check(p, t))
            for p, ts in zip(problems, texts) for t in ts]


def save_labelled(path, rows):
    write_jsonl(path, [{"prompt": p, "completion": c, "right": ok} for p, c, ok in rows])


def load_labelled(path):
    return [(r["prompt"], r["completion"], r["right"]) for r in read_jsonl(path)]


def per_problem(right, answers, rights, verifier_scores, k):
    """Each problem's pass@k, majority@k and best-of-k per verifier, at one k.
    right[i], answers[i]: each sample's label and canonical answer for problem i; rights[i]:
    its set of right answers (right_answers)."""
    rows = {"pass@k": [], "majority@k": []}
    rows.update({f"best-of-k {name}": [] for name in verifier_scores})
    for i, (r, a) in enumerate(zip(right, answers)):
        rows["pass@k"].append(pass_at_k(len(r), sum(r), k))
        rows["majority@k"].append(majority_at_k(a, rights[i], k))
        for name, s in verifier_scores.items():
            rows[f"best-of-k {name}"].append(best_of_k(s[i], r, k))
    return rows


def curves(right, answers, verifier_scores, ks):
    """Mean over problems of pass@k, majority@k and best-of-k per verifier, for each k; and at
    the largest k, the 95% bootstrap interval of each, and of each one's lead over majority."""
    res = {"k": ks, "by_problem": {}}  # by_problem[key][j]: each problem's value at ks[j]
    rights = [right_answers(a, r) for a, r in zip(answers, right)]  # once per problem, not per k
    for k in ks:
        rows = per_problem(right, answers, rights, verifier_scores, k)
        for key, values in rows.items():
            res.setdefault(key, []).append(sum(values) / len(values))
            res["by_problem"].setdefault(key, []).append([round(v, 6) for v in values])
    res["ci"] = {key: bootstrap_ci(v) for key, v in rows.items()}
    for base in ("majority@k", "best-of-k generator"):
        res[f"lead over {base} ci"] = {
            key: bootstrap_ci([x - y for x, y in zip(v, rows[base])])
            for key, v in rows.items() if key.startswith("best-of") and key != base}
    return res


def compute_per_sample(task, problems, prompts, comps, names):
    """Tokens every network processes per sample, on average: "sample" (its prompt encoded and
    its tokens generated) and each scorer's pass over it (every scorer here is a network of
    the generator's size; a rule or an exact check costs none). Padding is not counted."""
    n = len(comps)
    full = sum(len(p) + len(c) for p, c in zip(prompts, comps)) / n
    texts = [decode(c[:-1]) for c in comps]
    cot = sum(len(q) + len(c) for rows in cot_rows(task, problems, texts) for q, c in rows or ())
    cot /= n
    cost = {"sample": full, "genrm": full + len(encode(GENRM_QUESTION)), "genrm-cot": cot,
            "dpo-reward": 2 * full, "length": 0.0, "random": 0.0, "exact check (oracle)": 0.0}
    return {name: cost.get(name, full) for name in ["sample"] + names}


def pair_accuracy(right, s):
    """(share of held-out (right, wrong) pairs of the same problem that the scores rank right,
    share of pairs they tie). A tie counts 1/2, what picking one of the two at random scores:
    a constant score ranks pairs at exactly 0.5."""
    good = ties = total = 0
    for r, sc in zip(right, s):
        for a, b in product(range(len(r)), repeat=2):
            if r[a] and not r[b]:
                total += 1
                ties += sc[a] == sc[b]
                good += (sc[a] > sc[b]) + 0.5 * (sc[a] == sc[b])
    return (good / total, ties / total) if total else (float("nan"), float("nan"))


def run(args, task, P, D, test, out, device, new_model):
    """Algorithm 1: the generator iterations, the verifiers on D_VER, then test time. Each
    iteration's row and the eval row are commit points: a rerun on the folder resumes."""
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    gold = star.gold_examples(task, P, with_hints=False)
    generator_iterations(args, task, P + D, test, gold, out, device, new_model, rows)
    if not any(r.get("kind") == "eval" for r in rows):
        evaluate_test_time(args, task, test, gold, out, device)


def generator_iterations(args, task, problems, test, gold, out, device, new_model, rows):
    """G_SFT, then T iterations: sample and label, D_GEN grows by the right samples, G_n is
    trained from the base on it."""
    done = {r["iteration"] for r in rows if r.get("kind") == "iteration"}
    for n in range(args.iterations + 1):
        if n in done:
            continue
        t0, stats, right = time.time(), {}, []
        if n > 0:  # D_VER grows by every sample, right or wrong
            generator = load_checkpoint(generator_path(out, n - 1), device)[0].eval()
            texts, _ = star.sample(generator, task, problems, n=args.samples,
                                   temperature=args.temperature, seed=seed_for(args.seed,
                                   "samples", n), batch_size=args.sample_batch_size,
                                   desc=f"generator {n}: sample")
            labelled = label(task, problems, texts)
            save_labelled(labelled_path(out, n), labelled)
            right = [(p, c) for i in range(1, n + 1)
                     for p, c, ok in load_labelled(labelled_path(out, i)) if ok]
            stats = {"samples_right": sum(ok for _, _, ok in labelled) / len(labelled),
                     "d_gen": len(gold) + len(right)}
        torch.manual_seed(args.seed)  # G = SFT(base, D_GEN): a fresh base, as the paper restarts
        model = new_model()
        loss = star.finetune(model, gold + right, args.steps, args.lr, args.batch_size,
                             seed=seed_for(args.seed, "generator", n), desc=f"generator {n}: SFT",
                             compile=args.compile)
        acc, overall, _ = star.evaluate(model, task, test, args.sample_batch_size)
        save_checkpoint(generator_path(out, n), model, TOKENIZER, extra={"iteration": n})
        append_jsonl(os.path.join(out, "metrics.jsonl"), {
            "kind": "iteration", "iteration": n, "accuracy": overall,
            "accuracy_by_difficulty": {str(d): a for d, a in acc.items()}, "train_steps":
            args.steps, "train_loss": loss, **stats, "wall_s": round(time.time() - t0, 1)})
        tqdm.write(f"generator {n}: greedy accuracy {overall:.3f}")


def generator_path(out, n):
    return os.path.join(out, f"generator_iter{n}.pt")


def labelled_path(out, n):
    return os.path.join(out, f"labelled_iter{n}.jsonl")


def train_verifiers(args, task, d_ver, sft_path, device):
    """Every verifier from G_SFT on the same D_VER: {name: network}, and DPO's pair count."""
    dpo, n_pairs = train_dpo(sft_path, d_ver, args, device)
    nets = {"dpo": dpo, "dpo shared-prefix pairs": train_dpo(sft_path, d_ver, args, device,
                                                              nearest=True)[0],
            "orm": train_orm(sft_path, d_ver, args, device),
            "genrm": train_genrm(sft_path, d_ver, args, device)}
    if task.recheck(decode(d_ver[0][1][:-1])) is not None:  # (a gold solution) a rationale
        nets["genrm-cot"] = train_genrm_cot(sft_path, task, d_ver, args, device)
        # the format control: GenRM-CoT's per-step program labels given to the ORM's network
        nets["program"] = train_head(sft_path, program_step_rows(task, d_ver), args, device,
                                     "program", "PRM on program labels").eval()
    return nets, n_pairs


def score_samples(nets, task, problems, texts, reference, generator):
    """Every verifier's and baseline's score of each (problem, text) pair: {name: scores}."""
    prompts = [encode(task.prompt(p)) for p in problems]
    comps = [encode(t) + [EOT] for t in texts]
    dpo = scores(nets["dpo"], prompts, comps, "dpo")
    ref = scores(reference, prompts, comps, "dpo")
    flat = {"dpo": dpo,  # the paper's score, log V(y|x)
            "dpo-mean": [s / len(c) for s, c in zip(dpo, comps)],  # per completion token
            "dpo-reward": [s - r for s, r in zip(dpo, ref)],  # DPO's implicit reward
            "dpo shared-prefix pairs": scores(nets["dpo shared-prefix pairs"], prompts, comps,
                                              "dpo"),
            "orm": scores(nets["orm"], prompts, comps, "orm"),
            "genrm": scores(nets["genrm"], prompts, comps, "genrm")}
    if "genrm-cot" in nets:
        flat["genrm-cot"] = cot_scores(nets["genrm-cot"], task, problems, texts)
        flat["prm on program labels"] = program_scores(nets["program"], task, problems, texts)
        flat["exact check (oracle)"] = [float(task.check(p, t)) for p, t in zip(problems, texts)]
    # the baselines a learned verifier must beat: the generator's own confidence (its mean
    # token log-prob), the shortest solution first, and no preference at all
    flat.update({"generator": scores(generator, prompts, comps, "dpo-mean"),
                 "length": [-len(c) for c in comps], "random": [0.0] * len(comps)})
    if "genrm-cot" in nets:  # GenRM-CoT's rule without its learned arithmetic: what it adds
        flat["rule x generator"] = [g - (0.0 if task.rules_ok(p, t) else 1e3) for p, t, g in
                                    zip(problems, texts, flat["generator"])]
    return flat, prompts, comps


def evaluate_test_time(args, task, test, gold, out, device):
    """The verifiers, trained on D_VER (every labelled sample, and P's gold solutions, which
    count as right: the paper), then n samples per held-out problem from G_T, drawn once and
    scored by every verifier; the eval row."""
    t0 = time.time()
    d_ver = [(p, c, True) for p, c in gold] + \
        [x for n in range(1, args.iterations + 1) for x in load_labelled(labelled_path(out, n))]
    nets, n_pairs = train_verifiers(args, task, d_ver, generator_path(out, 0), device)
    save_checkpoint(os.path.join(out, "verifier_dpo.pt"), nets["dpo"], TOKENIZER)
    generator = load_checkpoint(generator_path(out, args.iterations), device)[0].eval()
    texts, _ = star.sample(generator, task, test, n=args.eval_samples,
                           temperature=args.temperature, batch_size=args.sample_batch_size,
                           seed=seed_for(args.seed, "test samples"), desc="test samples")
    n = args.eval_samples
    problems = [p for p in test for _ in range(n)]
    flat, prompts, comps = score_samples(nets, task, problems, [t for ts in texts for t in ts],
                                         load_checkpoint(generator_path(out, 0), device)[0].eval(),
                                         generator)
    verifier_scores = {name: [f[i * n:(i + 1) * n] for i in range(len(test))]
                       for name, f in flat.items()}
    # every sample labelled once; the estimators reuse the labels for every k and verifier
    right = [[task.check(p, t) for t in ts] for p, ts in zip(test, texts)]
    answers = [[task.extract_answer(t) for t in ts] for ts in texts]
    res = curves(right, answers, verifier_scores, [2 ** i for i in range(int(math.log2(n)) + 1)])
    res["tokens"] = compute_per_sample(task, problems, prompts, comps, list(flat))
    greedy = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
              if r.get("kind") == "iteration"][-1]["accuracy"]
    pairs = {name: pair_accuracy(right, s) for name, s in verifier_scores.items()}
    append_jsonl(os.path.join(out, "metrics.jsonl"), {
        "kind": "eval", "greedy": greedy, "n": n, "pairs": n_pairs, "d_ver": len(d_ver), **res,
        **{f"pair_acc {name}": acc for name, (acc, _) in pairs.items()},
        **{f"pair_ties {name}": ties for name, (_, ties) in pairs.items()},
        "wall_s": round(time.time() - t0, 1)})


def report(args, rows):
    """The table (generator per iteration, then accuracy against k) and vstar.png."""
    lines = ["| generator | greedy accuracy | right samples | D_GEN | steps | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "iteration":
            name = "G_SFT (P only)" if r["iteration"] == 0 else f"iteration {r['iteration']}"
            right = r.get("samples_right", float("nan"))
            lines.append(f"| {name} | {r['accuracy']:.3f} | {right:.3f} | {r.get('d_gen', '-')} "
                         f"| {r['train_steps']} | {r['wall_s']} |")
    ev = next((r for r in rows if r.get("kind") == "eval"), None)
    if ev is None:
        return "\n".join(lines)
    keys = list(ev["ci"])
    lines += ["", "| k | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, k in enumerate(ev["k"]):
        lines.append(f"| {k} | " + " | ".join(f"{ev[key][i]:.3f}" for key in keys) + " |")
    lines.append("| 95% CI | " + " | ".join("{:.3f}-{:.3f}".format(*ev["ci"][key])
                                             for key in keys) + " |")
    lines += [""] + equal_compute_table(ev)
    lines += ["", f"greedy {ev['greedy']:.3f}; {ev['pairs']} training pairs from "
              f"{ev['d_ver']} labelled samples"]
    plot_curves(ev, os.path.join(args.out, "vstar.png"), args.task)
    return "\n".join(lines)


def paired(ev, a, ja, b, jb):
    """Mean and 95% paired bootstrap interval of a at ks[ja] minus b at ks[jb], per problem."""
    diff = [x - y for x, y in zip(ev["by_problem"][a][ja], ev["by_problem"][b][jb])]
    return "{:+.3f} ({:+.3f} to {:+.3f})".format(sum(diff) / len(diff), *bootstrap_ci(diff))


def cost_of(ev, key, k):
    """Tokens per problem of a method at k samples: k samples, and k passes of its scorer."""
    name = key[len("best-of-k "):] if key.startswith("best-of-k ") else None
    return k * (ev["tokens"]["sample"] + (ev["tokens"][name] if name else 0.0))


def equal_compute_table(ev):
    """Each verifier at k = n against the generator's own log-prob at the same k (the same
    compute: one pass of a network of the same size per sample), and against majority vote
    at equal total compute: the verifier at the largest k that costs no more than majority@n."""
    n, ks, J = ev["k"][-1], ev["k"], len(ev["k"]) - 1
    gap = ev["pass@k"][-1] - ev["pass@k"][0]
    lines = [f"| at k = {n} | accuracy | tokens per problem | lead over the generator's log-prob "
             f"(95% paired CI) | k at the compute of majority@{n} | lead over majority@{n} "
             "there | gap pass@1 -> pass@k closed | held-out pair accuracy (ties) |",
             "|---|---|---|---|---|---|---|---|"]
    for key in [k for k in ev["ci"] if k.startswith("best-of-k ")]:
        name = key[len("best-of-k "):]
        j = max(i for i, k in enumerate(ks) if cost_of(ev, key, k) <= cost_of(ev, "m", n) + 1e-9
                or i == 0)
        vs_gen = "-" if name == "generator" else paired(ev, key, J, "best-of-k generator", J)
        closed = (ev[key][-1] - ev["pass@k"][0]) / gap if gap > 0 else float("nan")
        lines.append(f"| {name} | {ev[key][-1]:.3f} | {cost_of(ev, key, n):.0f} | {vs_gen} | "
                     f"{ks[j]} | {paired(ev, key, j, 'majority@k', J)} | {closed:.0%} | "
                     f"{ev['pair_acc ' + name]:.3f} ({ev['pair_ties ' + name]:.0%}) |")
    lines.append(f"| majority vote | {ev['majority@k'][-1]:.3f} | {cost_of(ev, 'm', n):.0f} | "
                 "- | - | - | - | - |")
    lines.append(f"| pass@{n} (the ceiling) | {ev['pass@k'][-1]:.3f} | {cost_of(ev, 'm', n):.0f} "
                 "| - | - | - | 100% | - |")
    return lines


def plot_curves(ev, path, task_name):
    """vstar.png: held-out accuracy against the tokens every network processed per problem."""
    with figure(path, figsize=(7, 4.2)) as (fig, ax):
        for key in ev["ci"]:
            if key not in ("best-of-k length", "best-of-k random", "best-of-k dpo-mean"):
                ax.plot([cost_of(ev, key, k) for k in ev["k"]], ev[key], marker="o", label=key,
                        ls="--" if key == "pass@k" or "oracle" in key else "-")
        ax.axhline(ev["greedy"], color="gray", ls=":", label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens processed per problem (samples and every scorer's passes)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"V-STaR on {task_name} (dashed: pass@k and the exact check, oracles)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
