"""
Test-time search: spend more generated tokens per problem, and measure what accuracy they buy.

Every method is given the same generator and a budget N, and counts exactly the tokens it made
the generator sample, so methods are compared at equal compute (the x-axis of search.png). The
recipes follow the public implementations summarised in ../shared/PAPERS.md:
- majority vote (self-consistency, Wang et al. 2022, arXiv 2203.11171), the vote weighted by a
  verifier, and best-of-N (Cobbe et al. 2021, arXiv 2110.14168) with GenRM-CoT (Zhang et al.
  2024, arXiv 2408.15240; vstar.train_genrm_cot), the best verifier of vstar.py;
- a process reward model on Math-Shepherd's Monte Carlo labels (Wang et al. 2024, arXiv
  2312.08935): a step's soft label is the share of rollouts from it that reach the right answer;
- step-level beam search as HF search-and-learn does it (Snell et al. 2024, arXiv 2408.03314):
  N beams each sample one step (a line), duplicates are dropped, the N/M best survive and are
  each repeated M times;
- MCTS over steps (RAP, Hao et al. 2023, arXiv 2305.14992; rStar-math, Guan et al. 2025, arXiv
  2501.04519): UCT selection, expansion by a few distinct sampled steps, a rollout to the end
  scored by the verifier, backup.
Beam search and MCTS are guided by a learned process scorer (GenRM-CoT's p(every step so far is
right) times the generator's own probability; the PRM), by the generator alone (the baseline),
or by the task's exact process verifier: an oracle, an upper bound, always labelled "oracle".

Run: python train.py --method search             (countdown by default; --task for another)
Test: python -m pytest tests/test_search.py
Under torchrun the stages train through model.py's DDP helpers and search a share of the
problems each (process r takes problem i if i % processes == r; results gathered in order). Every
sample has its own seed, so a problem's results depend on no other problem, process or count.

Deliberate departures:
1. The generator is M0 of star.py (fine-tuned on P), not a STaR-improved one, so the run fits
   a CPU; --checkpoint runs the same search on any trained generator.
2. Best-of-N and the votes come from one pool of --eval-samples samples per problem: best-of-N
   and majority vote exactly over every N-subset (vstar.best_of_k, vstar.majority_at_k), the
   weighted vote by Monte Carlo over random N-subsets; N samples cost N times the pool's mean.
3. The PRM scores a solution by its minimum step score (Math-Shepherd) and a prefix by its last
   step's (search-and-learn); it learns from the generator's samples of P+D with --rollouts per
   distinct step prefix (4 on a CPU; Math-Shepherd: 8). GenRM-CoT learns from the same samples
   and P's gold solutions, as V-STaR's verifiers do.
4. MCTS is anytime: one search of the largest budget is read off after 1, 2, 4, .. simulations;
   a rollout's value is the scorer's score of the finished solution (no PUCT prior). A node is
   expanded once, by --mcts-children samples: a step none of them drew is never tried there.
5. A step is one line of at most STEP_TOKENS tokens; a line that does not end in time, or a
   prefix that would overflow the model's block, is finished as it is (and judged wrong).
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
from model import (Cost, ScalarHead, all_gather, append_jsonl, autocast, bootstrap_ci, figure,
                   generate, load_checkpoint, rank_world, read_jsonl, save_checkpoint, seed_for,
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
    until a stop token (kept) or max_new tokens, counted into `cost`. model.generate encodes
    each prefix once and copies its cache rows to its continuations. Row r is drawn from
    seeds[r], and every prefix gets all the room the block leaves it, up to max_new (those with
    less are batched apart, by their room): a row's sample then depends neither on its
    batch-mates nor on its process (torchrun)."""
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
    cost.prompt += sum(map(len, prefixes))
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
    """Every process's results (a dict: problem index, or another key, -> result) merged in key
    order, and its counts (token counts) summed: what one process doing all the shares has."""
    merged, total = {}, [0] * len(counts)
    for res, cnt in all_gather((results, list(counts))):
        merged.update(res)
        total = [a + b for a, b in zip(total, cnt)]
    return dict(sorted(merged.items())), total


# -----------------------------------------------------------------------------
# Scorers: (problem, text, finished) items -> values in [0, 1]

def batched(fn, items, size=256):
    """fn on consecutive batches of items, its results concatenated."""
    return [v for i in range(0, len(items), size) for v in fn(items[i:i + size])]


def oracle_scorer(task):
    """The exact process verifier (ground truth): 1 if every step so far is right (and, when
    finished, the answer), else 0. For teaching and as an upper bound only."""
    def score(items):
        return [float(task.check(p, t)) if fin else float(all(task.check_steps(p, t)))
                for p, t, fin in items]
    return score


def logprob_scorer(model, task):
    """A language model as a scorer: exp(mean log p(y|x)) over a finished solution's tokens or a
    prefix's steps so far, in (0, 1] so it can weight a vote. With the generator itself: its
    own confidence, the baseline a verifier must beat. (Not vstar.scores: that splits its
    batches over the processes, and here each process scores its own problems.)"""
    @torch.no_grad()
    def score(chunk):
        comps = [encode(t) + ([EOT] if fin else []) for _, t, fin in chunk]
        logp = sequence_logprobs(model, [encode(task.prompt(p)) for p, _, _ in chunk], comps, PAD)
        return [math.exp(lp / max(1, len(c))) for lp, c in zip(logp.float().tolist(), comps)]
    return lambda items: batched(score, items)


def cot_scorer(verifier, task):
    """GenRM-CoT's p(Yes): a finished solution's p(every step is right), or a prefix's so far."""
    def score(items):
        return vstar.cot_scores(verifier, task, [t for _, t, _ in items],
                                [fin for _, _, fin in items])
    return score


def product_scorer(*scorers):
    """The product of scorers' values. GenRM-CoT x generator: p(every step so far is right)
    weighted by the generator's prior on which step to take (alone, the verifier favours the
    surest arithmetic, `1-1=0`, seldom on a path to the target)."""
    def score(items):
        return [math.prod(values) for values in zip(*(s(items) for s in scorers))]
    return score


def prm_scorer(prm, task):
    """Math-Shepherd's solution score: the minimum over steps of the PRM's P(step leads to a
    right answer). A prefix's is its last step's, as search-and-learn scores beams (under the
    minimum, siblings scoring above their parent's minimum would all tie)."""
    @torch.no_grad()
    def score(chunk):
        comps = [encode(t) + ([EOT] if fin else []) for _, t, fin in chunk]
        with autocast(str(prm.head.weight.device)):
            logits, mask = prm([encode(task.prompt(p)) for p, _, _ in chunk], comps,
                               [vstar.step_reads(c) for c in comps])
        p = torch.sigmoid(logits.float())  # (B, reads)
        last = p.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
        lowest = p.masked_fill(~mask, 1.0).min(1).values
        return [(lo if fin else la) for lo, la, (_, _, fin) in
                zip(lowest.tolist(), last.tolist(), chunk)]
    return lambda items: batched(score, items)


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
    label, (cost.sampled, cost.prompt) = gathered(label, (cost.sampled, cost.prompt))
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
        value = dict(zip(todo, scorer([(problems[i], t, False) for i, t in todo])))
        for i in range(len(problems)):
            cands = [t for t in live[i] if (i, t) in value]
            survivors = prune(cands, [value[(i, t)] for t in cands], keep)
            beams[i] = list(zip(survivors, refill(len(survivors), N))) if survivors else []
    for i, b in enumerate(beams):  # past MAX_STEPS: what is left is judged as it is
        pool[i] += [text for text, _ in b]
    items = [(problems[i], t, True) for i in range(len(problems)) for t in pool[i]]
    values = iter(scorer(items) if items else [])
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
    (answers by most-visited path, by value-weighted vote, cost.sampled, cost.prompt). Problem i
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
        values = scorer([(p, sol, True) for p, sol in zip(problems, sols)])
        for i, (path, v, sol) in enumerate(zip(paths, values, sols)):
            backup(path, v, sol)
            found[i].append((sol, v))
        if s in sims:
            voted = []
            for p, f in zip(problems, found):
                a = vote([task.extract_answer(t) for t, _ in f], [v for _, v in f])
                voted.append(next((t for t, _ in f if task.extract_answer(t) == a), ""))
            results[s] = ([most_visited(r) for r in roots], voted, cost.sampled, cost.prompt)
    return results


# -----------------------------------------------------------------------------
# The run: generator, learned scorers, every method at every budget; resumable by stage

def method_row(stage, method, scorer, budgets, acc, sampled, prompt, last, t0):
    """One method's metrics; `last` holds each test problem's rightness at the largest budget
    (the bootstrap intervals of the report are computed from it)."""
    return {"kind": "method", "stage": stage, "method": method, "scorer": scorer,
            "oracle": scorer == "oracle", "budget": budgets, "accuracy": acc, "tokens": sampled,
            "prompt_tokens": prompt, "last": last, "wall_s": round(time.time() - t0, 1)}


def pool_rows(model, task, test, scorers, budgets, args, t0):
    """Best-of-N, majority vote and weighted vote, from one pool of samples per problem (sample j
    of problem i from seed_for(seed, "pool", i, j)); each process samples and scores its share."""
    n, mine, learned = args.eval_samples, share(len(test)), ("GenRM-CoT", "PRM", "generator")
    cost, pool = Cost(), {}
    per = max(1, args.sample_batch_size // n)
    for c in tqdm(range(0, len(mine), per), desc="pool of samples", leave=False):
        chunk = mine[c:c + per]
        rows = rollouts(model, task, [(test[i], "") for i in chunk], [n] * len(chunk),
                        args.temperature, [seed_for(args.seed, "pool", i, j) for i in chunk
                                           for j in range(n)], cost)
        pool.update((i, rows[j * n:(j + 1) * n]) for j, i in enumerate(chunk))
    flat = [(test[i], t, True) for i, ts in pool.items() for t in ts]
    value = {name: scorers[name](flat) for name in learned}
    pool, (sampled, prompt) = gathered(  # every problem's samples and their values
        {i: (ts, {name: v[j * n:(j + 1) * n] for name, v in value.items()})
         for j, (i, ts) in enumerate(pool.items())}, (cost.sampled, cost.prompt))
    texts = [ts for ts, _ in pool.values()]
    value = {name: [v[name] for _, v in pool.values()] for name in learned}
    value["length"] = [[-len(t) for t in ts] for ts in texts]  # baselines: the shortest first,
    value["random"] = [[0.0] * n for _ in texts]                 # and no preference (= one sample)
    right = [[task.check(p, t) for t in ts] for p, ts in zip(test, texts)]
    answers = [[task.extract_answer(t) for t in ts] for ts in texts]
    ks, rng = [k for k in budgets if k <= n], random.Random(seed_for(args.seed, "weighted vote"))
    rights = [vstar.right_answers(a, r) for a, r in zip(answers, right)]
    per_k = [vstar.per_problem(right, answers, rights, value, k) for k in ks]  # exact estimators
    acc = {("majority vote", "-"): [rows["majority@k"] for rows in per_k],
           ("weighted vote", "GenRM-CoT"): [
               [weighted_vote_accuracy(a, r, k, w, rng) for a, r, w in
                zip(answers, right, value["GenRM-CoT"])] for k in ks],
           **{("best-of-N", name): [rows[f"best-of-k {name}"] for rows in per_k]
              for name in value},
           ("pass@N", "oracle"): [rows["pass@k"] for rows in per_k]}
    # N samples cost N times the mean sample; the prompt is encoded once per problem
    per_sample, prompt = sampled / (n * len(test)), prompt / len(test)
    pairs = {name: vstar.pair_accuracy(right, value[name]) for name in value}
    quality = {"kind": "scorer quality", "stage": "pool",  # held-out, on the pool
               **{f"pair_acc {name}": acc for name, (acc, _) in pairs.items()},
               **{f"pair_ties {name}": ties for name, (_, ties) in pairs.items()}}
    return [quality] + [method_row("pool", m, s, ks, [sum(v) / len(v) for v in a],
                                   [k * per_sample for k in ks], [prompt] * len(ks), a[-1], t0)
                        for (m, s), a in acc.items()]


def run(args, task, P, D, test, out, device, new_model):
    """Stages, each committed by appending its metrics rows: the generator, its labelled
    samples, the learned scorers, the pool (best-of-N and votes), then beam search and MCTS
    with each scorer. Started again on the same folder, finished stages are skipped."""
    metrics = os.path.join(out, "metrics.jsonl")
    done = {r["stage"] for r in read_jsonl(metrics)}
    budgets = [int(b) for b in str(args.budgets).split(",")]
    generator_path = os.path.join(out, "generator.pt")
    lab_path, ms_path = os.path.join(out, "labelled.jsonl"), os.path.join(out, "shepherd.jsonl")
    right_of = lambda texts: [float(task.check(p, t)) for p, t in zip(test, texts)]  # noqa
    acc_of = lambda texts: sum(right_of(texts)) / len(test)  # noqa

    if "generator" not in done:  # M0 of star.py, or the model given by --checkpoint as it is
        t0 = time.time()
        torch.manual_seed(args.seed)
        model = new_model()
        loss = None if args.checkpoint else star.train_start_model(model, task, P, args)
        save_checkpoint(generator_path, model, TOKENIZER)
        texts, n_tok = star.sample(model.eval(), task, test, temperature=0.0,
                                   batch_size=args.sample_batch_size, desc="greedy")
        texts = [t[0] for t in texts]
        append_jsonl(metrics, {"kind": "greedy", "stage": "generator", "accuracy": acc_of(texts),
                               "tokens": n_tok / len(test), "train_loss": loss,
                               "wall_s": round(time.time() - t0, 1)})
        tqdm.write(f"generator: greedy accuracy {acc_of(texts):.3f}")
    model = load_checkpoint(generator_path, device)[0].eval()

    if "labels" not in done:  # the generator's own samples of P+D, labelled two ways
        t0 = time.time()
        texts, n_tok = star.sample(model, task, P + D, n=args.samples, temperature=args.temperature,
                                   batch_size=args.sample_batch_size,
                                   seed=seed_for(args.seed, "labels"), desc="samples of P+D")
        labelled = vstar.label(task, P + D, texts)
        ms, cost = shepherd_labels(model, task, P + D, texts, args, seed_for(args.seed, "rollouts"))
        vstar.save_labelled(lab_path, labelled)
        write_jsonl(ms_path, ms)
        right = sum(ok for _, _, ok in labelled) / len(labelled)
        append_jsonl(metrics, {"kind": "labels", "stage": "labels", "samples_right": right,
                               "samples": len(labelled), "sample_tokens": n_tok,
                               "rollout_tokens": cost.sampled,
                               "wall_s": round(time.time() - t0, 1)})
        tqdm.write(f"labels: {right:.3f} of {len(labelled)} samples of P+D right")
    cot_path, prm_path = os.path.join(out, "genrm_cot.pt"), os.path.join(out, "prm.pt")
    if "scorers" not in done:
        t0 = time.time()
        gold = [(p, c, True) for p, c in star.gold_examples(task, P, with_hints=False)]
        cot = vstar.train_genrm_cot(generator_path, task, gold + vstar.load_labelled(lab_path),
                                    args, device)
        save_checkpoint(cot_path, cot, TOKENIZER)
        prm = vstar.train_head(generator_path, read_jsonl(ms_path), args, device, "prm",
                               "PRM (Math-Shepherd)")
        save_checkpoint(prm_path, prm.gpt, TOKENIZER, extra={"head": prm.head.state_dict()})
        append_jsonl(metrics, {"kind": "scorers", "stage": "scorers",
                               "wall_s": round(time.time() - t0, 1)})
    gpt, ckpt = load_checkpoint(prm_path, device)
    prm = ScalarHead(gpt).to(device).eval()
    prm.head.load_state_dict(ckpt["extra"]["head"])
    scorers = {"oracle": oracle_scorer(task), "PRM": prm_scorer(prm, task),
               "GenRM-CoT": cot_scorer(load_checkpoint(cot_path, device)[0].eval(), task),
               "generator": logprob_scorer(model, task)}
    scorers["GenRM-CoT x generator"] = product_scorer(scorers["GenRM-CoT"], scorers["generator"])

    # this process's share of the test problems, each searched from its own seed: a resumed run,
    # or any number of processes, samples what one whole run would have
    mine = share(len(test))
    seeds = lambda *stage: [seed_for(args.seed, *stage, i) for i in mine]  # noqa: E731
    if "pool" not in done:
        t0 = time.time()
        append_jsonl(metrics, *pool_rows(model, task, test, scorers, budgets, args, t0))

    def budget_row(stage, method, name, results, t0):  # results[i]: (texts, sampled, prompt)
        return method_row(stage, method, name, budgets, [acc_of(t) for t, _, _ in results],
                          [n / len(test) for _, n, _ in results],
                          [n / len(test) for _, _, n in results], right_of(results[-1][0]), t0)

    for name in ("GenRM-CoT x generator", "PRM", "generator", "oracle"):
        stage = f"beam {name}"
        if stage not in done:
            t0, results = time.time(), []
            for N in tqdm(budgets, desc=f"beam search ({name})", leave=False):
                cost = Cost()
                texts = beam_search(model, task, [test[i] for i in mine], scorers[name], N,
                                    args.beam_width, args.temperature, seeds(stage, N), cost)
                texts, (sampled, prompt) = gathered(dict(zip(mine, texts)),
                                                    (cost.sampled, cost.prompt))
                results.append((list(texts.values()), sampled, prompt))
                tqdm.write(f"beam search ({name}) N={N}: accuracy {acc_of(results[-1][0]):.3f}"
                           f", {sampled / len(test):.0f} tokens per problem")
            append_jsonl(metrics, budget_row(stage, "beam search", name, results, t0))
        stage = f"mcts {name}"
        if stage not in done:
            t0 = time.time()
            res = mcts(model, task, [test[i] for i in mine], scorers[name], budgets,
                       args.mcts_children, args.mcts_c, args.temperature, seeds(stage), Cost())
            # after s simulations: every problem's (most-visited, voted) answers, and the tokens
            res = [gathered(dict(zip(mine, zip(*res[s][:2]))), res[s][2:]) for s in budgets]
            rows = [budget_row(stage, f"MCTS {how}", name, [([a[j] for a in got.values()], *n)
                                                            for got, n in res], t0)
                    for j, how in enumerate(("most-visited", "weighted vote"))]
            append_jsonl(metrics, *rows)
            tqdm.write(f"MCTS ({name}) {budgets[-1]} simulations: accuracy "
                       f"{rows[0]['accuracy'][-1]:.3f}, {rows[0]['tokens'][-1]:.0f} tokens per "
                       "problem")


# -----------------------------------------------------------------------------
# Report: the test-time-scaling plot and the table

def report(args, rows):
    """search.png (accuracy against generated tokens per problem, log x, one line per method)
    and the markdown table it returns."""
    greedy = next((r for r in rows if r["kind"] == "greedy"), None)
    lab = next((r for r in rows if r["kind"] == "labels"), None)
    quality = next((r for r in rows if r["kind"] == "scorer quality"), {})
    methods = [r for r in rows if r["kind"] == "method"]
    budgets = sorted({b for r in methods for b in r["budget"]})
    lines = [f"greedy decoding: accuracy {greedy['accuracy']:.3f} at {greedy['tokens']:.1f} "
             "tokens per problem" if greedy else "",
             f"learned scorers trained on {lab['samples']} samples of P+D "
             f"({lab['samples_right']:.3f} right); Math-Shepherd rollouts: "
             f"{lab['rollout_tokens']} tokens" if lab else "",
             "held-out pair accuracy (ties count 1/2; share tied): " + ", ".join(
                 f"{k[9:]} {v:.3f} ({quality.get('pair_ties ' + k[9:], float('nan')):.0%})"
                 for k, v in quality.items() if k.startswith("pair_acc")), "",
             "accuracy (generated tokens per problem) at budget N; oracle rows are upper bounds "
             "guided by the ground truth", "",
             "| method | scorer | " + " | ".join(f"N={b}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for r in methods:
        cell = {b: f"{a:.3f} ({t:.0f})" for b, a, t in zip(r["budget"], r["accuracy"],
                                                           r["tokens"])}
        lines.append(f"| {r['method']} | {r['scorer']} | " +
                     " | ".join(cell.get(b, "-") for b in budgets) + " |")
    # 95% bootstrap intervals over the test problems at each method's largest budget, and of
    # its lead over majority vote at the same N (paired: the same problems resampled)
    majority = next((r for r in methods if r["method"] == "majority vote"), None)
    lines += ["", "| method | scorer | N | accuracy (95% CI) | lead over majority vote (95% CI) |",
              "|---|---|---|---|---|"]
    for r in methods:
        N, acc, last = r["budget"][-1], r["accuracy"][-1], r["last"]
        lead = "-"
        if majority and majority["budget"][-1] == N and r is not majority:
            diff = [x - y for x, y in zip(last, majority["last"])]
            lead = "{:+.3f} ({:+.3f} to {:+.3f})".format(
                sum(diff) / len(diff), *bootstrap_ci(diff))
        lines.append(f"| {r['method']} | {r['scorer']} | {N} | {acc:.3f} "
                     "({:.3f} to {:.3f}) | {} |".format(*bootstrap_ci(last), lead))
    from matplotlib import colormaps, ticker
    with figure(os.path.join(args.out, "search.png"), figsize=(8.5, 5)) as (fig, ax):
        names = list(dict.fromkeys(r["method"] for r in methods))  # a colour per method
        style = {"oracle": ("--", "s"), "PRM": ("-.", "^"), "GenRM-CoT": ("-", "o"),
                 "GenRM-CoT x generator": ("-", "D"), "generator": (":", "x"), "-": ("-", "o")}
        for r in methods:
            if r["scorer"] in ("length", "random"):  # in the table; flat lines in the plot
                continue
            ls, marker = style.get(r["scorer"], ("-", "o"))
            ax.plot(r["tokens"], r["accuracy"], ls=ls, marker=marker,
                    color=colormaps["tab10"](names.index(r["method"]) % 10),
                    label=r["method"] + ("" if r["scorer"] == "-" else f" ({r['scorer']})"))
        if greedy:
            ax.plot([greedy["tokens"]], [greedy["accuracy"]], "k*", ms=12, label="greedy")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set(xlabel="generated tokens per problem", ylabel="test accuracy",
               title=f"test-time search on {args.task} (dashed: oracle-guided upper bounds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return "\n".join(lines)
