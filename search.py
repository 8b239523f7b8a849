"""
Test-time search: spend more compute per problem, and measure what accuracy it buys.

Every method is given the same generator and a budget N, and counts every token a network
processes (Cost): those the generator samples, the prompt and prefix tokens it encodes (beam
search and MCTS re-read each prefix every round), and those each scorer reads, weighted by its
size relative to the generator's. Methods are compared at that total (search.png's x-axis).
- majority vote (self-consistency, Wang et al. 2022, arXiv 2203.11171); best-of-N (Cobbe et al.
  2021, arXiv 2110.14168) and the vote weighted by a learned scorer: GenRM-CoT (Zhang et al.
  2024, arXiv 2408.15240; vstar.train_genrm_cot), the PRM, the generator's log-prob, or
  GenRM-CoT x generator. With the same scorer at equal total compute, these two are the
  baselines a step-level search must beat (the report pairs them problem by problem);
- a process reward model on Math-Shepherd's Monte Carlo labels (Wang et al. 2024, arXiv
  2312.08935): a step's soft label is the share of rollouts from it that reach the right answer;
- step-level beam search as HF search-and-learn does it (Snell et al. 2024, arXiv 2408.03314):
  N beams each sample one step (a line), duplicates are dropped, the N/M best survive and are
  each repeated M times;
- MCTS over steps (RAP, Hao et al. 2023, arXiv 2305.14992; rStar-math, Guan et al. 2025, arXiv
  2501.04519): UCT selection, expansion by a few distinct sampled steps, a rollout to the end
  scored by the verifier, backup.
A search guided by the task's exact process verifier is "oracle-guided" (its 0/1 ties broken at
random): for teaching, not a bound. pass@N, a right answer among N samples, is the ceiling
of any pick from the pool (best-of-N, votes), not of a search, which may spend more.

Run: python train.py --method search   (countdown by default; --task for another)
Test: python -m pytest tests/test_search.py
Under torchrun process r searches the problems i with i % processes == r, every sample from its
own seed; results and token counts are gathered: any number of processes gives one's results.

Deliberate departures: the generator is M0 of star.py (--checkpoint: any trained one); the pool
rows come from one pool of --eval-samples samples per problem, exact over every N-subset
(vstar.best_of_k, vstar.majority_at_k; the weighted vote by Monte Carlo); the PRM scores a
solution by its lowest step score, a prefix by its last step's; MCTS is anytime (one search read
off after 1, 2, 4, .. simulations), values a rollout by its scored solution (no PUCT prior) and
expands a node once, by --mcts-children samples; a step is a line of at most STEP_TOKENS tokens,
and a line that does not end in time, or a prefix that would overflow the block, is finished.
"""
import math
import os
import random
import time
from itertools import accumulate

import torch
from tqdm import tqdm

import star
import vstar
from model import (ScalarHead, all_gather, append_jsonl, autocast, bootstrap_ci, figure, generate,
                   load_checkpoint, rank_world, read_jsonl, save_checkpoint, seed_for,
                   sequence_logprobs, write_jsonl)
from tasks import EOT, EOTH, NEWLINE, PAD, SOT, TOKENIZER, decode, encode

# Every setting of a run, per preset (train.py fills the flags left unset from here, and refuses
# the others). Budgets are N: samples of best-of-N and the votes, beams of beam search,
# simulations of MCTS.
_SHARED = dict(task="countdown", temperature=1.0, verifier_lr=1e-4, beam_width=4,
               mcts_children=4, mcts_c=1.0, checkpoint=None, compile=False)
DEFAULTS = {
    "tiny": dict(_SHARED, n_train=1000, n_unlabeled=200, n_test=200, steps=1200, batch_size=32,
                 lr=2e-3, sample_batch_size=300, samples=2, eval_samples=16, verifier_steps=200,
                 rollouts=4, budgets="1,2,4,8,16"),
    "small": dict(_SHARED, n_train=1000, n_unlabeled=1000, n_test=300, steps=3000,
                  batch_size=64, lr=1e-3, sample_batch_size=500, samples=4, eval_samples=32,
                  verifier_steps=1000, rollouts=8, budgets="1,2,4,8,16,32"),
    "gpu": dict(_SHARED, n_train=2000, n_unlabeled=5000, n_test=1000, steps=3000,
                batch_size=256, lr=1e-3, sample_batch_size=2048, samples=8, eval_samples=64,
                verifier_steps=2000, rollouts=8, budgets="1,2,4,8,16,32,64"),
}
STEP_TOKENS = 24      # longest step line (countdown's "100*12=1200" is 11 tokens)
ROLLOUT_TOKENS = 160  # longest rollout to the end of a solution
MAX_STEPS = 12        # deepest prefix beam search and MCTS build
BANNED = (SOT, EOTH, PAD)
PRODUCT = "GenRM-CoT x generator"
LEARNED = (PRODUCT, "PRM", "generator")  # what guides the learned searches


class Cost:
    """Tokens the networks process: `sampled` by the generator, `prompt` (prompt and prefix
    tokens it encodes before sampling) and `scored` (read by scorers, times relative_size).
    Padding is not counted: an artefact of batching (a batch of one has none)."""

    def __init__(self, sampled=0, prompt=0, scored=0):
        self.sampled, self.prompt, self.scored = sampled, prompt, scored

    def counts(self):
        return [self.sampled, self.prompt, self.scored]


def relative_size(net, generator):
    """A token `net` reads, in generator tokens: their parameter ratio (1 for every scorer here,
    all fine-tuned from the generator)."""
    return sum(p.numel() for p in net.parameters()) / sum(p.numel() for p in generator.parameters())


# -----------------------------------------------------------------------------
# Steps and rollouts: continuations of prefixes, tokens counted, so beam search's refill,
# MCTS's expansion, Math-Shepherd's rollouts and the pool are cheap; each row from its own seed

def prefix_ids(task, p, text):
    """What the generator reads: the prompt, then the steps so far (each ended by a newline)."""
    return encode(task.prompt(p) + text)


def fits(model, task, p, text):
    """Is there room in the block for one more step after this prefix?"""
    return len(prefix_ids(task, p, text)) + STEP_TOKENS <= model.config.block_size


def continue_prefixes(model, prefixes, copies, max_new, stop, temperature, seeds, cost):
    """copies[u] continuations of each token list prefixes[u] (prefix 0's copies first), each
    until a stop token (kept) or max_new tokens, counted into `cost`; model.generate encodes
    each prefix once for all its copies. Row r is drawn from seeds[r], and every prefix gets all
    the room the block leaves it, up to max_new (batched apart by room), so a row depends
    neither on its batch-mates nor on its process (torchrun)."""
    room = [min(max_new, model.config.block_size - len(x)) for x in prefixes]
    first, rows = [0, *accumulate(copies)], [None] * len(prefixes)  # prefix u's first row
    for r in sorted(set(room), reverse=True):
        group = [u for u in range(len(prefixes)) if room[u] == r]
        with autocast(str(next(model.parameters()).device)):
            tokens, _, lengths = generate(
                model, [prefixes[u] for u in group], r, stop, PAD, temperature,
                banned_tokens=BANNED, copies=[copies[u] for u in group],
                seeds=[seeds[first[u] + j] for u in group for j in range(copies[u])])
        done = iter(row[:n] for row, n in zip(tokens.tolist(), lengths.tolist()))
        for u in group:
            rows[u] = [next(done) for _ in range(copies[u])]
    cost.sampled += sum(len(row) for rs in rows for row in rs)
    cost.prompt += sum(map(len, prefixes))  # each prefix encoded once (its cache rows shared)
    return [row for rs in rows for row in rs]


def sample_steps(model, task, nodes, copies, temperature, seeds, cost):
    """One more line for copies[i] continuations of each (problem, prefix text) nodes[i], row r
    from seeds[r]: (line, finished) pairs; a line ended by end-of-text, or by running out of
    tokens, is finished."""
    rows = continue_prefixes(model, [prefix_ids(task, p, text) for p, text in nodes], copies,
                             STEP_TOKENS, (NEWLINE, EOT), temperature, seeds, cost)
    return [(decode(t for t in row if t not in (NEWLINE, EOT)), not row or row[-1] != NEWLINE)
            for row in rows]


def rollouts(model, task, nodes, copies, temperature, seeds, cost):
    """copies[i] completions to the end (end-of-text) of each (problem, prefix text) nodes[i],
    row r from seeds[r]: the texts of the finished solutions, prefix included."""
    rows = continue_prefixes(model, [prefix_ids(task, p, text) for p, text in nodes], copies,
                             ROLLOUT_TOKENS, (EOT,), temperature, seeds, cost)
    starts = [text for (_, text), c in zip(nodes, copies) for _ in range(c)]
    return [s + decode(t for t in row if t != EOT) for s, row in zip(starts, rows)]


def share(n):
    """This process's problems of n: under torchrun the i with i % processes == rank."""
    rank, world = rank_world()
    return list(range(rank, n, world))


def gathered(results, counts):
    """Every process's results (a dict: key -> result) merged in key order, and its counts (of
    tokens) summed: what one process doing all the shares has."""
    merged, total = {}, [0] * len(counts)
    for res, cnt in all_gather((results, list(counts))):
        merged.update(res)
        total = [a + b for a, b in zip(total, cnt)]
    return dict(sorted(merged.items())), total


# -----------------------------------------------------------------------------
# Scorers: (problem, text, finished) items and a Cost -> values in [0, 1]; every call counts
# the tokens its network reads into the Cost

def network_scorer(task, weight, values):
    """A scorer whose network reads each item's prompt and text (a finished one ended by
    end-of-text): values(rows, items) on batches of (prompt ids, completion ids) rows, every
    token read counted times weight (relative_size)."""
    def score(items, cost, size=256):
        rows = [(encode(task.prompt(p)), encode(t) + ([EOT] if fin else []))
                for p, t, fin in items]
        cost.scored += weight * sum(len(q) + len(c) for q, c in rows)
        return [v for i in range(0, len(rows), size)
                for v in values(rows[i:i + size], items[i:i + size])]
    return score


def oracle_scorer(task, tie_seed=None):
    """The exact process verifier (ground truth): 1 if every step so far is right (and, when
    finished, the answer), else 0. A program: no network tokens. With tie_seed, plus 1e-6 times
    a draw seeded by (tie_seed, problem, text): ties go at random, the same in any batch."""
    def score(items, cost):
        exact = [float(task.check(p, t)) if fin else float(all(task.check_steps(p, t)))
                 for p, t, fin in items]
        return exact if tie_seed is None else [
            v + 1e-6 * random.Random(seed_for(tie_seed, p.question, t)).random()
            for v, (p, t, _) in zip(exact, items)]
    return score


def logprob_scorer(model, task, weight=1.0):
    """A language model as a scorer: exp(mean log p(y|x)) over a finished solution's tokens or a
    prefix's steps so far, in (0, 1] so it can weight a vote. With the generator itself: its
    own confidence, the baseline a verifier must beat. (Not vstar.scores: that splits its
    batches over the processes, and here each process scores its own problems.)"""
    @torch.no_grad()
    def values(rows, items):
        logp = sequence_logprobs(model, [q for q, _ in rows], [c for _, c in rows], PAD)
        return [math.exp(lp / max(1, len(c))) for lp, (_, c) in zip(logp.float().tolist(), rows)]
    return network_scorer(task, weight, values)


def cot_scorer(verifier, task, weight=1.0):
    """GenRM-CoT's p(Yes): a finished solution's p(every step is right), or a prefix's so far.
    It reads the (step, claim) rows of vstar.cot_rows (none where the rules already say no)."""
    def score(items, cost):
        args = ([p for p, _, _ in items], [t for _, t, _ in items], [f for _, _, f in items])
        cost.scored += weight * sum(len(q) + len(c) for rows in vstar.cot_rows(task, *args)
                                    for q, c in rows or ())
        return vstar.cot_scores(verifier, task, *args)
    return score


def product_scorer(*scorers):
    """The product of scorers' values (each one's tokens counted). GenRM-CoT x generator: p(every
    step so far is right) weighted by the generator's prior on which step to take (alone, the
    verifier favours the surest arithmetic, `1-1=0`, seldom on a path to the target)."""
    def score(items, cost):
        return [math.prod(values) for values in zip(*(s(items, cost) for s in scorers))]
    return score


def prm_scorer(prm, task, weight=1.0):
    """Math-Shepherd's solution score: the minimum over steps of the PRM's P(step leads to a
    right answer). A prefix's is its last step's, as search-and-learn scores beams (under the
    minimum, siblings scoring above their parent's minimum would all tie)."""
    @torch.no_grad()
    def values(rows, items):
        with autocast(str(prm.head.weight.device)):
            logits, mask = prm([q for q, _ in rows], [c for _, c in rows],
                               [vstar.step_reads(c) for _, c in rows])
        p = torch.sigmoid(logits.float())  # (B, reads)
        last = p.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1).tolist()
        lowest = p.masked_fill(~mask, 1.0).min(1).values.tolist()
        return [lo if fin else la for lo, la, (_, _, fin) in zip(lowest, last, items)]
    return network_scorer(task, weight, values)


# -----------------------------------------------------------------------------
# Training the PRM on Math-Shepherd's Monte Carlo labels

def shepherd_labels(model, task, problems, texts, args, seed):
    """Math-Shepherd: a step prefix's soft label is the share of args.rollouts completions from
    it that the outcome verifier accepts; a whole solution's label is its own outcome. Distinct
    prefixes are rolled out once, rollout r of prefix `pre` of problem i from seed_for(seed, i,
    pre, r); under torchrun each process rolls out its share of the problems. Returns the rows
    model.train_bce takes (prompt ids, completion ids, read positions, one label per read) for
    every sample, and the cost."""
    mine = set(share(len(problems)))
    keys = list(dict.fromkeys((i, pre) for i, ts in enumerate(texts) if i in mine for t in ts
                              for pre in vstar.step_prefixes(t)))
    cost, label, R = Cost(), {}, args.rollouts
    chunk_size = max(1, args.sample_batch_size // R)
    bar = tqdm(range(0, len(keys), chunk_size), desc="Math-Shepherd rollouts", leave=False,
               dynamic_ncols=True)
    for start in bar:
        chunk = keys[start:start + chunk_size]
        sols = rollouts(model, task, [(problems[i], pre) for i, pre in chunk], [R] * len(chunk),
                        args.temperature, [seed_for(seed, i, pre, r) for i, pre in chunk
                                           for r in range(R)], cost)
        for j, (i, pre) in enumerate(chunk):
            label[(i, pre)] = sum(task.check(problems[i], s) for s in sols[j * R:(j + 1) * R]) / R
        bar.set_postfix(mean_label=f"{sum(label.values()) / len(label):.2f}")
    label, counts = gathered(label, cost.counts())
    cost = Cost(*counts)
    rows = []
    for i, (p, ts) in enumerate(zip(problems, texts)):
        for t in ts:
            c = encode(t) + [EOT]
            labels = [label[(i, pre)] for pre in vstar.step_prefixes(t)]
            rows.append((encode(task.prompt(p)), c, vstar.step_reads(c),
                         labels + [float(task.check(p, t))]))
    return rows, cost


# -----------------------------------------------------------------------------
# Votes over a pool of samples

def vote(answers, weights=None):
    """The answer with the most votes (or, with weights, the largest summed weight).

    An unparsable answer (None) casts no vote, so it never wins; with no parsable answer the
    result is None (wrong). Ties go to the tied answer that appears first in `answers`: the
    samples are i.i.d. and drawn in random order, so that is a uniform tie break."""
    total, first = {}, {}
    for j, a in enumerate(answers):
        if a is not None:
            total[a] = total.get(a, 0.0) + (1.0 if weights is None else weights[j])
            first.setdefault(a, j)
    return max(total, key=lambda a: (total[a], -first[a])) if total else None


def weighted_vote_accuracy(answers, right, k, weights, rng, trials=32):
    """Mean rightness of the weighted vote over `trials` random k-subsets of one problem's pool:
    Monte Carlo, as no exact count is known for summed weights (vstar.majority_at_k is exact)."""
    right_of = {a: ok for a, ok in zip(answers, right)}  # an answer's samples agree on rightness
    hits = 0
    for _ in range(trials):
        sub = rng.sample(range(len(answers)), k)
        won = vote([answers[j] for j in sub], [weights[j] for j in sub])
        hits += won is not None and right_of[won]
    return hits / trials


# -----------------------------------------------------------------------------
# Step-level beam search

def prune(cands, scores, keep):
    """The `keep` best distinct candidates: exact duplicates dropped first (they would eat
    beam slots), then sorted by score, highest first; equal scores keep their order."""
    best = {}
    for c, s in zip(cands, scores):
        best.setdefault(c, s)
    return sorted(best, key=lambda c: -best[c])[:keep]


def refill(n_survivors, N):
    """Copies of each survivor so that N beams sample next: N // n each, the best ones one
    more for the remainder (search-and-learn repeats each of N/M survivors M times)."""
    q, r = divmod(N, n_survivors)
    return [q + (j < r) for j in range(n_survivors)]


def beam_search(model, task, problems, scorer, N, M, temperature, seeds, cost):
    """N beams per problem, all problems in lockstep. Each round every beam samples one step;
    finished solutions go to a pool; the rest are deduplicated, scored, the N // M best kept
    and refilled to N. A problem stops when its pool holds N solutions or nothing is left.
    Problem i samples row j of round r from seed_for(seeds[i], r, j), whatever the others do.
    Returns each problem's chosen solution (the pool's best by the scorer; "" if none)."""
    keep = max(1, N // min(M, N))
    beams = [[("", N)] for _ in problems]  # (prefix text, copies sampling next)
    pool = [[] for _ in problems]
    for r in range(MAX_STEPS):
        jobs = [(i, text, c) for i, b in enumerate(beams) for text, c in b]
        if not jobs:
            break
        row_seeds = [seed_for(seeds[i], r, j) for i, b in enumerate(beams)
                     for j in range(sum(c for _, c in b))]
        lines = iter(sample_steps(model, task, [(problems[i], text) for i, text, _ in jobs],
                                  [c for _, _, c in jobs], temperature, row_seeds, cost))
        live = [[] for _ in problems]
        for i, text, c in jobs:
            for _ in range(c):
                line, fin = next(lines)
                new = text + line if fin else text + line + "\n"
                if fin or not fits(model, task, problems[i], new):
                    pool[i].append(new)
                else:
                    live[i].append(new)
        todo = [(i, t) for i in range(len(problems)) for t in dict.fromkeys(live[i])
                if len(pool[i]) < N]
        value = dict(zip(todo, scorer([(problems[i], t, False) for i, t in todo], cost)))
        for i in range(len(problems)):
            cands = [t for t in live[i] if (i, t) in value]
            survivors = prune(cands, [value[(i, t)] for t in cands], keep)
            beams[i] = list(zip(survivors, refill(len(survivors), N))) if survivors else []
    for i, b in enumerate(beams):  # past MAX_STEPS: what is left is judged as it is
        pool[i] += [text for text, _ in b]
    items = [(problems[i], t, True) for i in range(len(problems)) for t in pool[i]]
    values = iter(scorer(items, cost) if items else [])
    vs = [[(next(values), j) for j in range(len(pool[i]))] for i in range(len(problems))]
    return [pool[i][max(v)[1]] if v else "" for i, v in enumerate(vs)]  # ties: the latest


# -----------------------------------------------------------------------------
# MCTS over reasoning steps

class Node:
    """A prefix of steps in one problem's tree: visits N, total value W, the best solution
    found through it (value, text), and whether it is finished (a whole solution)."""

    def __init__(self, text, finished=False, parent=None):
        self.text, self.finished, self.parent = text, finished, parent
        self.children, self.N, self.W = [], 0, 0.0
        self.best = (-1.0, "")


def uct(child, parent_N, c):
    """UCT = W/N + c * sqrt(ln N_parent / N): the PARENT's visits in the log (not the root's,
    not the child's own: a classic bug)."""
    return child.W / child.N + c * math.sqrt(math.log(parent_N) / child.N)


def select_child(node, c):
    """An unvisited child first (in order of creation), else the child of highest UCT."""
    for ch in node.children:
        if ch.N == 0:
            return ch
    return max(node.children, key=lambda ch: uct(ch, node.N, c))


def select(root, c):
    """The path from the root down to a node without children (unexpanded, or finished)."""
    path = [root]
    while path[-1].children:
        path.append(select_child(path[-1], c))
    return path


def backup(path, v, solution):
    """N += 1, W += v on every node of the path (and no other), which also remember the best
    solution seen through them."""
    for node in path:
        node.N += 1
        node.W += v
        if v > node.best[0]:
            node.best = (v, solution)


def most_visited(root):
    """Follow the most-visited child (ties: higher mean value) to the bottom; its best
    solution is the answer."""
    node = root
    while node.children:
        node = max(node.children, key=lambda ch: (ch.N, ch.W / max(ch.N, 1)))
    return node.best[1]


def mcts(model, task, problems, scorer, sims, k, c, temperature, seeds, cost):
    """One tree per problem, all grown in lockstep, max(sims) simulations each: select by UCT;
    expand the leaf by sampling k next steps (duplicates merged); evaluate its first new child
    by a rollout to the end, scored; back up. After s simulations for each s in `sims`, records
    (answers by most-visited path, by value-weighted vote, cost.counts() so far). Problem i
    draws simulation s's k samples and its rollout from seed_for(seeds[i], s, j), j = 0..k."""
    roots = [Node("") for _ in problems]
    found = [[] for _ in problems]  # every evaluated solution with its value
    results = {}
    for s in range(1, max(sims) + 1):
        paths = [select(r, c) for r in roots]
        grow = [i for i, path in enumerate(paths) if not path[-1].finished]
        lines = sample_steps(model, task, [(problems[i], paths[i][-1].text) for i in grow],
                             [k] * len(grow), temperature,
                             [seed_for(seeds[i], s, j) for i in grow for j in range(k)], cost)
        for j, i in enumerate(grow):
            leaf = paths[i][-1]
            for line, fin in lines[j * k:(j + 1) * k]:
                text = leaf.text + line + ("" if fin else "\n")
                if all(ch.text != text for ch in leaf.children):
                    depth = text.count("\n")
                    fin = fin or depth >= MAX_STEPS or not fits(model, task, problems[i], text)
                    leaf.children.append(Node(text, fin, leaf))
            paths[i].append(leaf.children[0])
        todo = [i for i, path in enumerate(paths) if not path[-1].finished]
        sols = [path[-1].text for path in paths]
        done_sols = rollouts(model, task, [(problems[i], sols[i]) for i in todo], [1] * len(todo),
                             temperature, [seed_for(seeds[i], s, k) for i in todo], cost)
        for i, sol in zip(todo, done_sols):
            sols[i] = sol
        values = scorer([(p, sol, True) for p, sol in zip(problems, sols)], cost)
        for i, (path, v, sol) in enumerate(zip(paths, values, sols)):
            backup(path, v, sol)
            found[i].append((sol, v))
        if s in sims:
            voted = []
            for p, f in zip(problems, found):
                a = vote([task.extract_answer(t) for t, _ in f], [v for _, v in f])
                voted.append(next((t for t, _ in f if task.extract_answer(t) == a), ""))
            results[s] = ([most_visited(r) for r in roots], voted, cost.counts())
    return results


# -----------------------------------------------------------------------------
# The run: generator, learned scorers, every method at every budget; resumable by stage

def method_row(stage, method, scorer, budgets, right, counts, t0):
    """One method's metrics at each budget: accuracy, each test problem's rightness (for the
    paired intervals) and tokens per problem: in all ("tokens", the x-axis) and by kind
    (counts[b]: sampled, prompt, scored), rounded (float sums over processes may differ in
    their last bits)."""
    per = lambda xs: [round(x, 3) for x in xs]  # noqa: E731
    sampled, prompt, scored = zip(*counts)
    return {"kind": "method", "stage": stage, "method": method, "scorer": scorer,
            "budget": budgets, "accuracy": [sum(r) / len(r) for r in right],
            "tokens": per(map(sum, counts)), "sampled_tokens": per(sampled),
            "prompt_tokens": per(prompt), "scorer_tokens": per(scored), "right_by_budget": right,
            "wall_s": round(time.time() - t0, 1)}


def pool_rows(model, task, test, scorers, budgets, args, t0):
    """Best-of-N, majority vote, the weighted votes and pass@N, from one pool of samples per
    problem (sample j of problem i from seed_for(seed, "pool", i, j)); each process samples and
    scores its share. N samples cost the prompt once (the N share its cache), N times the mean
    sample, and N times the mean tokens the method's scorer reads of one."""
    n, mine, learned = args.eval_samples, share(len(test)), ("GenRM-CoT", *LEARNED)
    cost, pool, spent = Cost(), {}, {name: Cost() for name in learned}
    per = max(1, args.sample_batch_size // n)
    for c in tqdm(range(0, len(mine), per), desc="pool of samples", leave=False):
        chunk = mine[c:c + per]
        rows = rollouts(model, task, [(test[i], "") for i in chunk], [n] * len(chunk),
                        args.temperature, [seed_for(args.seed, "pool", i, j) for i in chunk
                                           for j in range(n)], cost)
        pool.update((i, rows[j * n:(j + 1) * n]) for j, i in enumerate(chunk))
    flat = [(test[i], t, True) for i, ts in pool.items() for t in ts]
    value = {name: scorers[name](flat, spent[name]) for name in learned}
    pool, counts = gathered(  # every problem's samples and their values
        {i: (ts, {name: v[j * n:(j + 1) * n] for name, v in value.items()})
         for j, (i, ts) in enumerate(pool.items())},
        [cost.sampled, cost.prompt] + [spent[name].scored for name in learned])
    sample, prompt = counts[0] / (n * len(test)), counts[1] / len(test)
    reads = dict(zip(learned, (c / (n * len(test)) for c in counts[2:])))  # per sample
    texts = [ts for ts, _ in pool.values()]
    value = {name: [v[name] for _, v in pool.values()] for name in learned}
    value["length"] = [[-len(t) for t in ts] for ts in texts]  # baselines: the shortest first,
    value["random"] = [[0.0] * n for _ in texts]                 # and no preference (= one sample)
    right = [[task.check(p, t) for t in ts] for p, ts in zip(test, texts)]
    answers = [[task.extract_answer(t) for t in ts] for ts in texts]
    ks, rng = [k for k in budgets if k <= n], random.Random(seed_for(args.seed, "weighted vote"))
    rights = [vstar.right_answers(a, r) for a, r in zip(answers, right)]
    per_k = [vstar.per_problem(right, answers, rights, value, k) for k in ks]  # exact estimators
    by_method = {("majority vote", "-"): [rows["majority@k"] for rows in per_k],
                 **{("weighted vote", name): [[weighted_vote_accuracy(a, r, k, w, rng) for a, r, w
                                               in zip(answers, right, value[name])] for k in ks]
                    for name in learned},
                 **{("best-of-N", name): [rows[f"best-of-k {name}"] for rows in per_k]
                    for name in value},
                 ("pass@N", "oracle"): [rows["pass@k"] for rows in per_k]}
    pairs = {name: vstar.pair_accuracy(right, value[name]) for name in value}
    quality = {"kind": "scorer quality", "stage": "pool",  # held-out, on the pool
               **{f"pair_acc {name}": acc for name, (acc, _) in pairs.items()},
               **{f"pair_ties {name}": ties for name, (_, ties) in pairs.items()}}
    return [quality] + [method_row("pool", m, s, ks, r, [(k * sample, prompt, k * reads.get(s, 0))
                                                         for k in ks], t0)  # programs read none
                        for (m, s), r in by_method.items()]


def run(args, task, P, D, test, out, device, new_model):
    """Stages, each committed by appending its metrics rows: the generator, its labelled
    samples, the learned scorers, the pool (best-of-N and votes), then beam search and MCTS
    with each scorer. Started again on the same folder, finished stages are skipped."""
    metrics = os.path.join(out, "metrics.jsonl")
    done = {r["stage"] for r in read_jsonl(metrics)}
    budgets = [int(b) for b in str(args.budgets).split(",")]
    path = {name: os.path.join(out, name) for name in ("generator.pt", "labelled.jsonl",
                                                       "shepherd.jsonl", "genrm_cot.pt", "prm.pt")}
    right_of = lambda texts: [float(task.check(p, t)) for p, t in zip(test, texts)]  # noqa
    per_problem = lambda counts: [c / len(test) for c in counts]  # noqa: E731

    if "generator" not in done:  # M0 of star.py, or the model given by --checkpoint as it is
        t0 = time.time()
        torch.manual_seed(args.seed)
        model = new_model()
        loss = None if args.checkpoint else star.train_start_model(model, task, P, args)
        save_checkpoint(path["generator.pt"], model, TOKENIZER)
        texts, n_tok = star.sample(model.eval(), task, test, temperature=0.0,
                                   batch_size=args.sample_batch_size, desc="greedy")
        acc = sum(right_of([t[0] for t in texts])) / len(test)
        prompt = sum(len(prefix_ids(task, p, "")) for p in test)
        append_jsonl(metrics, {"kind": "greedy", "stage": "generator", "accuracy": acc,
                               "tokens": (n_tok + prompt) / len(test),
                               "sampled_tokens": n_tok / len(test), "train_loss": loss,
                               "wall_s": round(time.time() - t0, 1)})
        tqdm.write(f"generator: greedy accuracy {acc:.3f}")
    model = load_checkpoint(path["generator.pt"], device)[0].eval()

    if "labels" not in done:  # the generator's own samples of P+D, labelled two ways
        t0 = time.time()
        texts, n_tok = star.sample(model, task, P + D, n=args.samples, temperature=args.temperature,
                                   batch_size=args.sample_batch_size,
                                   seed=seed_for(args.seed, "labels"), desc="samples of P+D")
        labelled = vstar.label(task, P + D, texts)
        ms, cost = shepherd_labels(model, task, P + D, texts, args, seed_for(args.seed, "rollouts"))
        vstar.save_labelled(path["labelled.jsonl"], labelled)
        write_jsonl(path["shepherd.jsonl"], ms)
        right = sum(ok for _, _, ok in labelled) / len(labelled)
        append_jsonl(metrics, {"kind": "labels", "stage": "labels", "samples_right": right,
                               "samples": len(labelled), "sample_tokens": n_tok,
                               "rollout_tokens": cost.sampled,
                               "wall_s": round(time.time() - t0, 1)})
        tqdm.write(f"labels: {right:.3f} of {len(labelled)} samples of P+D right")
    if "scorers" not in done:
        t0 = time.time()
        gold = [(p, c, True) for p, c in star.gold_examples(task, P, with_hints=False)]
        gold += vstar.load_labelled(path["labelled.jsonl"])
        cot = vstar.train_genrm_cot(path["generator.pt"], task, gold, args, device)
        save_checkpoint(path["genrm_cot.pt"], cot, TOKENIZER)
        prm = vstar.train_head(path["generator.pt"], read_jsonl(path["shepherd.jsonl"]), args,
                               device, "prm", "PRM (Math-Shepherd)")
        save_checkpoint(path["prm.pt"], prm.gpt, TOKENIZER, extra={"head": prm.head.state_dict()})
        append_jsonl(metrics, {"kind": "scorers", "stage": "scorers",
                               "wall_s": round(time.time() - t0, 1)})
    gpt, ckpt = load_checkpoint(path["prm.pt"], device)
    prm = ScalarHead(gpt).to(device).eval()
    prm.head.load_state_dict(ckpt["extra"]["head"])
    cot = load_checkpoint(path["genrm_cot.pt"], device)[0].eval()
    # each network's tokens weighted by its size (the PRM's by its GPT's: its head is one dot
    # product per read)
    scorers = {"PRM": prm_scorer(prm, task, relative_size(gpt, model)),
               "GenRM-CoT": cot_scorer(cot, task, relative_size(cot, model)),
               "generator": logprob_scorer(model, task)}
    scorers[PRODUCT] = product_scorer(scorers["GenRM-CoT"], scorers["generator"])

    # this process's share of the test problems, each searched from its own seed: a resumed run,
    # or any number of processes, samples what one whole run would have
    mine = share(len(test))
    seeds = lambda *stage: [seed_for(args.seed, *stage, i) for i in mine]  # noqa: E731
    if "pool" not in done:
        t0 = time.time()
        append_jsonl(metrics, *pool_rows(model, task, test, scorers, budgets, args, t0))
    for name in (*LEARNED, "oracle"):
        for stage in (f"beam {name}", f"mcts {name}"):
            if stage in done:
                continue
            t0, problems = time.time(), [test[i] for i in mine]
            scorer = (oracle_scorer(task, seed_for(args.seed, stage, "ties")) if name == "oracle"
                      else scorers[name])
            if stage.startswith("beam"):
                right, spent = [], []
                for N in tqdm(budgets, desc=f"beam search ({name})", leave=False):
                    cost = Cost()
                    texts = beam_search(model, task, problems, scorer, N, args.beam_width,
                                        args.temperature, seeds(stage, N), cost)
                    texts, counts = gathered(dict(zip(mine, texts)), cost.counts())
                    right.append(right_of(list(texts.values())))
                    spent.append(per_problem(counts))
                rows = [method_row(stage, "beam search", name, budgets, right, spent, t0)]
            else:
                res = mcts(model, task, problems, scorer, budgets, args.mcts_children, args.mcts_c,
                           args.temperature, seeds(stage), Cost())
                # after s simulations: every problem's (most-visited, voted) answers, the tokens
                res = [gathered(dict(zip(mine, zip(*res[s][:2]))), res[s][2]) for s in budgets]
                rows = [method_row(stage, f"MCTS {how}", name, budgets,
                                   [right_of([a[j] for a in got.values()]) for got, _ in res],
                                   [per_problem(n) for _, n in res], t0)
                        for j, how in enumerate(("most-visited", "weighted vote"))]
            append_jsonl(metrics, *rows)
            tqdm.write(f"{rows[0]['method']} ({name}) at {budgets[-1]}: accuracy "
                       f"{rows[0]['accuracy'][-1]:.3f}, {rows[0]['tokens'][-1]:.0f} tokens per "
                       "problem in all")


# -----------------------------------------------------------------------------
# Report: the equal-compute comparisons, the table and the test-time-scaling plot

def equal_compute_pairs(methods):
    """Each learned-guided search at its largest budget, paired problem by problem with
    best-of-N and the weighted vote by the same scorer at the pool budget N whose total compute
    is the smallest at or above the search's (the largest N if none is: 'pool smaller').
    Yields (search row, pool row, index of that N, pool smaller, mean difference, 95% CI)."""
    pool = {(r["method"], r["scorer"]): r for r in methods if r["stage"] == "pool"}
    for r in methods:
        if r["stage"] == "pool" or r["scorer"] not in LEARNED:
            continue
        for b in filter(None, (pool.get((m, r["scorer"])) for m in ("best-of-N", "weighted vote"))):
            j = next((j for j, t in enumerate(b["tokens"]) if t >= r["tokens"][-1]), None)
            smaller, j = j is None, len(b["tokens"]) - 1 if j is None else j
            diff = [x - y for x, y in zip(r["right_by_budget"][-1], b["right_by_budget"][j])]
            yield r, b, j, smaller, sum(diff) / len(diff), bootstrap_ci(diff)


def headline_differences(rows):
    """The equal-compute pairs of a run's metrics rows: name -> (mean difference, 95% paired
    interval), what tests/seeds.py compares over seeds."""
    methods = [r for r in rows if r.get("kind") == "method"]
    return {f"{r['method']} - {b['method']} ({r['scorer']}), equal total compute": (d, ci)
            for r, b, _, _, d, ci in equal_compute_pairs(methods)}


def label(r):
    """A row's name in the table and the plot: oracle-guided searches, and pass@N the ceiling of
    the pool's picks (a search that spends more may pass it)."""
    scorer = {"-": "", "oracle": " (oracle-guided)"}.get(r["scorer"], f" ({r['scorer']})")
    return "pass@N (the pool's ceiling)" if r["method"] == "pass@N" else r["method"] + scorer


def table(rows):
    """The markdown report: accuracy and tokens at every budget; at each method's largest, its
    95% interval, its lead over majority vote at the same N and, for a learned-guided search,
    over best-of-N and the weighted vote by its scorer at equal total compute (all paired)."""
    kind = {r["kind"]: r for r in rows}
    greedy, lab, quality = kind.get("greedy"), kind.get("labels"), kind.get("scorer quality", {})
    methods = [r for r in rows if r["kind"] == "method"]
    budgets = sorted({b for r in methods for b in r["budget"]})
    ci = "{:+.3f} ({:+.3f} to {:+.3f})".format
    lines = [f"greedy decoding: accuracy {greedy['accuracy']:.3f} at {greedy['tokens']:.1f} "
             f"tokens per problem ({greedy['sampled_tokens']:.1f} sampled)" if greedy else "",
             f"learned scorers trained on {lab['samples']} samples of P+D "
             f"({lab['samples_right']:.3f} right); Math-Shepherd rollouts: "
             f"{lab['rollout_tokens']} tokens" if lab else "",
             "held-out pair accuracy (ties count 1/2; share tied): " + ", ".join(
                 f"{k[9:]} {v:.3f} ({quality.get('pair_ties ' + k[9:], float('nan')):.0%})"
                 for k, v in quality.items() if k.startswith("pair_acc")), "",
             "accuracy (total / sampled tokens per problem) at budget N. Total: every token a "
             "network processes (sampled, prompt and prefixes encoded, read by a scorer)", "",
             "| method | " + " | ".join(f"N={b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for r in methods:
        cell = {b: f"{a:.3f} ({t:.0f} / {s:.0f})" for b, a, t, s in
                zip(r["budget"], r["accuracy"], r["tokens"], r["sampled_tokens"])}
        lines.append(f"| {label(r)} | " + " | ".join(cell.get(b, "-") for b in budgets) + " |")
    # 95% bootstrap intervals over the test problems (paired: the same problems resampled)
    pairs = {(id(r), b["method"]): f"N={b['budget'][j]}, {b['tokens'][j]:.0f} tokens"
             f"{', pool smaller' if small else ''}: {ci(d, *c)}"
             for r, b, j, small, d, c in equal_compute_pairs(methods)}
    majority = next((r for r in methods if r["method"] == "majority vote"), None)
    lines += ["", "at each method's largest N; oracle-guided searches are steered by the ground "
              "truth, pass@N is the ceiling of any pick from the pool", "",
              "| method | N | accuracy (95% CI) | lead over majority vote | lead over best-of-N, "
              "same scorer, equal total compute | lead over the weighted vote, same scorer, "
              "equal total compute |", "|---" * 6 + "|"]
    for r in methods:
        N, last = r["budget"][-1], r["right_by_budget"][-1]
        lead = "-"
        if majority and majority["budget"][-1] == N and r is not majority:
            diff = [x - y for x, y in zip(last, majority["right_by_budget"][-1])]
            lead = ci(sum(diff) / len(diff), *bootstrap_ci(diff))
        acc = "{:.3f} ({:.3f} to {:.3f})".format(r["accuracy"][-1], *bootstrap_ci(last))
        cells = [label(r), N, acc, lead, *(pairs.get((id(r), m), "-") for m in ("best-of-N",
                                                                               "weighted vote"))]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plot(path, task_name, rows):
    """Accuracy against total compute per problem (log x), one line per method."""
    from matplotlib import colormaps, ticker
    methods = [r for r in rows if r["kind"] == "method" and r["scorer"] not in ("length", "random")]
    names = list(dict.fromkeys(r["method"] for r in methods))  # a colour per method
    style = {"oracle": ("--", "s"), "PRM": ("-.", "^"), "GenRM-CoT": ("-", "o"),
             PRODUCT: ("-", "D"), "generator": (":", "x"), "-": ("-", "o")}
    with figure(path, figsize=(8.5, 5)) as (fig, ax):
        for r in methods:  # (best-of-N by length or at random: in the table, flat lines here)
            ls, marker = ("-", "P") if r["method"] == "pass@N" else style[r["scorer"]]
            ax.plot(r["tokens"], r["accuracy"], ls=ls, marker=marker, label=label(r),
                    color=colormaps["tab10"](names.index(r["method"]) % 10))
        for r in rows:
            if r["kind"] == "greedy":
                ax.plot([r["tokens"]], [r["accuracy"]], "k*", ms=12, label="greedy")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set(xlabel="total compute per problem (log): tokens processed by all networks\n"
                      "(sampled, prompt and prefixes encoded, read by scorers)",
               ylabel="test accuracy", title=f"test-time search on {task_name}\n(dashed: "
               "oracle-guided searches; pass@N: the pool's ceiling)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))


def report(args, rows):
    """search.png, and the markdown table it returns."""
    plot(os.path.join(args.out, "search.png"), args.task, rows)
    return table(rows)
