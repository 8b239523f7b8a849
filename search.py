"""
Test-time search: spend more compute per problem and measure what accuracy it buys, counting
every token a network processes (TokenCount: sampled, prompt and prefixes encoded, read by a
scorer in proportion to its size). Best-of-N and votes over one pool (self-consistency, Wang et
al. 2022, arXiv 2203.11171) against step-level beam search (Snell et al. 2024, arXiv 2408.03314)
and MCTS over steps (RAP, arXiv 2305.14992; rStar-math, arXiv 2501.04519), each guided by
a learned recheck (GenRM-CoT's form, arXiv 2408.15240, on program-written rationales) times the
generator's log-prob, a PRM on Math-Shepherd's labels (arXiv 2312.08935), the generator's
log-prob, or the exact verifier ("oracle-guided": the headroom, for teaching, not a bound).

    generator_stage(P); labels_stage(P + D); scorers_stage()     # M0 of star.py, PRM, recheck
    evaluate_pool(N)        # best-of-N, majority and weighted votes, pass@N (the pool's ceiling)
    for scorer in --guides: evaluate_beam, evaluate_mcts      # each problem's tokens apart
    table: each search against best-of-N and the weighted vote by its scorer at equal compute,
      over all problems and per group (Snell et al.'s bins: number count, 5 oracle levels of
      pass@1, 5 levels predicted by a scorer); the compute-optimal choice per group

Run: python train.py --method search   (torchrun splits the problems; any count gives one result)
"""
import argparse
import math
import os
import random
import time
from collections import defaultdict

import torch
from tqdm import tqdm

import star
import vstar
from common import (SWITCH, TokenCount, autocast, bootstrap_ci, commit, committed, figure, flag,
                    load_checkpoint, merge_shares, my_share, paired_difference, positive,
                    presets, read_jsonl, relative_size, right_answers, save_checkpoint,
                    seed_for, setting, vote, weighted_vote_accuracy, with_ci, write_jsonl)
from model import ScalarHead
from tasks import EOT, NEWLINE, TOKENIZER, decode, encode

PRODUCT = "learned recheck x generator"
GUIDES = {"recheck": PRODUCT, "generator": "generator", "prm": "PRM", "oracle": "oracle"}


def guide_list(text):
    """--guides: comma-separated names of GUIDES, checked (argparse's type)."""
    bad = [g for g in text.split(",") if g not in GUIDES]
    if bad or not text:
        raise argparse.ArgumentTypeError(f"{bad[0] if bad else text!r} is not a guide; choose "
                                         "comma-separated names of " + ", ".join(GUIDES))
    return text


# Every flag search takes beyond train.py's own, with its value per preset (tiny, small, gpu).
FLAGS = [
    setting("--task", "countdown"),
    # data
    flag("--n-train", positive(int), (1000, 1000, 2000), "size of P, problems with gold solutions"),
    flag("--n-unlabeled", positive(int), (200, 1000, 5000), "size of D, answer-only problems"),
    flag("--n-test", positive(int), (200, 300, 1000), "held-out test problems"),
    # the generator: M0 of star.py
    flag("--checkpoint", str, None, "the generator, instead of training M0 on P"),
    flag("--steps", positive(int), (1200, 3000, 3000), "fine-tuning steps of the generator on P"),
    flag("--batch-size", positive(int), (32, 64, 256), "examples per training step"),
    flag("--lr", positive(float), (2e-3, 1e-3, 1e-3), "peak learning rate"),
    flag("--compile", SWITCH, False, "torch.compile the training forward"),
    flag("--sample-batch-size", positive(int), (300, 500, 2048), "prompts per sampling batch"),
    flag("--temperature", float, 1.0, "sampling temperature of every sample, step and rollout"),
    vstar.CALCULATOR,
    # the learned scorers, from the generator on its own labelled samples of P + D
    flag("--samples", positive(int), (2, 4, 8), "the scorers' samples per problem of P + D"),
    flag("--rollouts", positive(int), (4, 8, 8), "PRM labels: Math-Shepherd rollouts per prefix"),
    flag("--prm-labels", ["soft", "hard", "exact"], "soft",
         "the PRM's step labels: soft (share of rollouts ending right), hard (1 if any did; both "
         "Math-Shepherd's), exact (the program's: every step right, the target reachable)"),
    flag("--verifier-steps", positive(int), (200, 1000, 2000), "training steps of each scorer"),
    flag("--verifier-lr", positive(float), 1e-4, "learning rate of the PRM"),
    # the searches
    flag("--eval-samples", positive(int), (32, 64, 128),
         "pool size per test problem, a power of 2 (best-of-N and votes up to it: at least the "
         "searches' compute)"),
    flag("--bin-samples", positive(int), (8, 32, 64),
         "more samples per test problem, apart from the pool: its pass@1, the oracle levels"),
    flag("--budgets", str, ("1,2,4,8,16", "1,2,4,8,16,32", "1,2,4,8,16,32,64"),
         "budgets N, e.g. 1,2,4,8,16: best-of-N/vote samples, beam search beams, MCTS simulations"),
    flag("--beam-width", positive(int), 4, "M: each of the N/M surviving beams repeated M times"),
    flag("--mcts-children", positive(int), 4, "steps per MCTS expansion (duplicates merged)"),
    flag("--mcts-c", float, 1.0, "UCT's exploration constant c"),
    flag("--guides", guide_list, "recheck,oracle",
         "scorers that guide beam search and MCTS, of " + ", ".join(GUIDES) + " (recheck: the "
         "learned recheck x the generator; oracle: the exact check, the headroom)"),
]
DEFAULTS = presets(FLAGS)
STEP_TOKENS = 24      # longest step line (countdown's "100*12=1200" is 11 tokens)
ROLLOUT_TOKENS = 160  # longest rollout to the end of a solution
MAX_STEPS = 12        # deepest prefix beam search and MCTS build
COMPUTE_BUDGETS = (128, 256, 512, 1024, 2048)  # tokens per problem: compute-optimal's budgets
LEARNED = (PRODUCT, "PRM", "generator")  # the learned scorers (of the pool's samples too)
FACTORS = ("learned recheck", "generator")  # PRODUCT's


# -----------------------------------------------------------------------------
# Steps and rollouts: continuations of prefixes sharing their cache, each row from its own seed

def prefix_ids(task, p, text):
    """What the generator reads: the prompt, then the steps so far (each ended by a newline)."""
    return encode(task.prompt(p) + text)


def fits(model, task, p, text):
    return len(prefix_ids(task, p, text)) + STEP_TOKENS <= model.config.block_size


def node_tool(task, nodes):
    """The task's tool (None if it has none) for continuations of (problem, prefix text) nodes."""
    return task.tool and star.row_tool(task, [p for p, _ in nodes], [text for _, text in nodes])


def sample_steps(model, task, nodes, copies, temperature, seeds, cost):
    """One more line for copies[i] continuations of each (problem, prefix text) nodes[i], row r
    from seeds[r]: (line, finished) pairs; ended by end-of-text or out of tokens is finished."""
    rows = star.continue_prefixes(model, [prefix_ids(task, p, text) for p, text in nodes], copies,
                                  STEP_TOKENS, (NEWLINE, EOT), temperature, seeds, cost,
                                  tool=node_tool(task, nodes), keys=[p.question for p, _ in nodes])
    return [(decode(t for t in row if t not in (NEWLINE, EOT)), not row or row[-1] != NEWLINE)
            for row in rows]


def rollouts(model, task, nodes, copies, temperature, seeds, cost):
    """copies[i] completions to the end (end-of-text) of each (problem, prefix text) nodes[i],
    row r from seeds[r]: the texts of the finished solutions, prefix included."""
    rows = star.continue_prefixes(model, [prefix_ids(task, p, text) for p, text in nodes], copies,
                                  ROLLOUT_TOKENS, (EOT,), temperature, seeds, cost,
                                  tool=node_tool(task, nodes), keys=[p.question for p, _ in nodes])
    starts = [text for (_, text), c in zip(nodes, copies) for _ in range(c)]
    return [s + decode(t for t in row if t != EOT) for s, row in zip(starts, rows)]


# -----------------------------------------------------------------------------
# Scorers: (problem, text, finished) items and a TokenCount -> values in [0, 1]; the PRM's labels

def network_scorer(task, weight, values):
    """A scorer calling values(rows, items) on batches of (prompt ids, completion ids: a finished
    text ended by end-of-text), every token its network reads counted times weight (each
    problem's apart too). Batches of like lengths (less padding), the values in items' order."""
    def score(items, cost, size=256):
        rows = [(encode(task.prompt(p)), encode(t) + ([EOT] if fin else [])) for p, t, fin in items]
        for (q, c), (p, _, _) in zip(rows, items):
            cost.add("scored", weight * (len(q) + len(c)), p.question)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        out = [None] * len(rows)
        for i in range(0, len(rows), size):
            at = order[i:i + size]
            for j, v in zip(at, values([rows[j] for j in at], [items[j] for j in at])):
                out[j] = v
        return out
    return score


def oracle_scorer(task, tie_seed=None):
    """The exact process verifier: 1 if every step so far (and a finished answer) is right, else
    0. With tie_seed, + 1e-6 x a draw seeded by (tie_seed, problem, text): ties go at random."""
    def score(items, cost):
        exact = [float(task.check(p, t)) if fin else float(all(task.check_steps(p, t)))
                 for p, t, fin in items]
        return exact if tie_seed is None else [
            v + 1e-6 * random.Random(seed_for(tie_seed, p.question, t)).random()
            for v, (p, t, _) in zip(exact, items)]
    return score


def logprob_scorer(model, task, weight=1.0):
    """The generator's own confidence exp(mean log p(y|x)), in (0, 1]: the baseline to beat."""
    @torch.no_grad()
    def values(rows, items):
        return [math.exp(lp) for lp in vstar.logprobs(model, [q for q, _ in rows],
                                                      [c for _, c in rows], mean=True)]
    return network_scorer(task, weight, values)


def recheck_scorer(verifier, task, weight=1.0):
    """The learned recheck's p(every step so far is right), reading vstar.recheck_rows' rows."""
    def score(items, cost):
        args = ([p for p, _, _ in items], [t for _, t, _ in items], [f for _, _, f in items])
        for p, rows in zip(args[0], vstar.recheck_rows(task, *args)):
            cost.add("scored", weight * sum(len(q) + len(c) for q, c in rows or ()), p.question)
        return vstar.recheck_scores(verifier, task, *args)
    return score


def product_scorer(*scorers):
    """The product of scorers' values. Learned recheck x generator: p(steps right) times the
    prior on which step to take (alone, the recheck favours the surest arithmetic, `1-1=0`)."""
    def score(items, cost):
        return [math.prod(values) for values in zip(*(s(items, cost) for s in scorers))]
    return score


def prm_scorer(prm, task, weight=1.0):
    """Math-Shepherd: a solution's score is the minimum over steps of the PRM's P(right answer), a
    prefix's its last step's (search-and-learn's; under the minimum, siblings would tie)."""
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


def shepherd_labels(model, task, problems, texts, args, seed):
    """Math-Shepherd's soft labels of each problem's texts: a step prefix's from args.rollouts
    rollouts, a solution's its outcome. Returns train_bce's rows, and the rollouts' TokenCount."""
    # 1) the distinct step prefixes of this process's share of the problems
    mine = set(my_share(len(problems)))
    keys = list(dict.fromkeys((i, pre) for i, ts in enumerate(texts) if i in mine for t in ts
                              for pre in vstar.step_prefixes(t)))
    # 2) R rollouts from each (prefixes batched): its label is the share of them that end right
    cost, soft, R = TokenCount(), {}, args.rollouts
    per_batch = max(1, args.sample_batch_size // R)
    bar = tqdm(range(0, len(keys), per_batch), desc="Math-Shepherd rollouts", leave=False)
    for start in bar:
        chunk = keys[start:start + per_batch]
        sols = rollouts(model, task, [(problems[i], pre) for i, pre in chunk], [R] * len(chunk),
                        args.temperature, [seed_for(seed, i, pre, r) for i, pre in chunk
                                           for r in range(R)], cost)
        for j, (i, pre) in enumerate(chunk):
            soft[(i, pre)] = sum(task.check(problems[i], s) for s in sols[j * R:(j + 1) * R]) / R
        bar.set_postfix(mean_label=f"{sum(soft.values()) / len(soft):.2f}")
    # 3) every process's labels; a row per sample: a label per step prefix, then its outcome;
    # beside them the program's exact labels (every step so far right, the target reachable)
    soft, counts = merge_shares(soft, cost.counts())
    rows = []
    for i, (p, ts) in enumerate(zip(problems, texts)):
        for t in ts:
            c, outcome = encode(t) + [EOT], float(task.check(p, t))
            labels = [soft[(i, pre)] for pre in vstar.step_prefixes(t)] + [outcome]
            exact = [float(all(task.check_steps(p, pre))) for pre in vstar.step_prefixes(t)]
            rows.append((encode(task.prompt(p)), c, vstar.step_reads(c), labels, exact + [outcome]))
    return rows, TokenCount(*counts)


def prm_rows(rows, labels):
    """train_bce's rows from shepherd_labels' with the labels asked for: soft (Math-Shepherd's
    share of rollouts ending right), hard (1 if any did), or exact (the program's)."""
    pick = {"soft": lambda soft, exact: soft,
            "hard": lambda soft, exact: [float(x > 0) for x in soft],
            "exact": lambda soft, exact: exact}[labels]
    return [(q, c, reads, pick(soft, exact)) for q, c, reads, soft, exact in rows]


# -----------------------------------------------------------------------------
# Step-level beam search

def prune(cands, scores, keep):
    """The `keep` best distinct candidates (duplicates would eat beam slots), stably sorted."""
    best = {}
    for c, s in zip(cands, scores):
        best.setdefault(c, s)
    return sorted(best, key=lambda c: -best[c])[:keep]


def refill(n_survivors, N):
    """Copies of each survivor so that N beams sample next: N // n each, the best one more."""
    q, r = divmod(N, n_survivors)
    return [q + (j < r) for j in range(n_survivors)]


def beam_search(model, task, problems, scorer, N, M, temperature, seeds, cost):
    """N beams per problem, the problems in lockstep, until each problem's pool of finished texts
    holds N. Returns each pool's best text by the scorer ("" if none)."""
    keep = max(1, N // min(M, N))
    beams, pool = [[("", N)] for _ in problems], [[] for _ in problems]  # (prefix, copies)
    for r in range(MAX_STEPS):
        # 1) every beam samples a step: row j of problem i from seed_for(seeds[i], r, j)
        jobs = [(i, text, c) for i, b in enumerate(beams) for text, c in b]
        if not jobs:
            break
        row_seeds = [seed_for(seeds[i], r, j) for i, b in enumerate(beams)
                     for j in range(sum(c for _, c in b))]
        lines = iter(sample_steps(model, task, [(problems[i], text) for i, text, _ in jobs],
                                  [c for _, _, c in jobs], temperature, row_seeds, cost))
        # 2) finished texts, and those with no room for another step, join the pool
        live = [[] for _ in problems]
        for i, text, c in jobs:
            for _ in range(c):
                line, fin = next(lines)
                new = text + line + ("" if fin else "\n")
                done = fin or not fits(model, task, problems[i], new)
                (pool if done else live)[i].append(new)
        # 3) the distinct live prefixes of pools not yet full scored, the N // M best refilled to N
        todo = [(i, t) for i in range(len(problems)) for t in dict.fromkeys(live[i])
                if len(pool[i]) < N]
        value = dict(zip(todo, scorer([(problems[i], t, False) for i, t in todo], cost)))
        for i in range(len(problems)):
            cands = [t for t in live[i] if (i, t) in value]
            survivors = prune(cands, [value[(i, t)] for t in cands], keep)
            beams[i] = list(zip(survivors, refill(len(survivors), N))) if survivors else []
    # 4) past MAX_STEPS what is left is judged as it is: each pool's best (ties: the latest)
    for i, b in enumerate(beams):
        pool[i] += [text for text, _ in b]
    items = [(problems[i], t, True) for i in range(len(problems)) for t in pool[i]]
    values = iter(scorer(items, cost) if items else [])
    vs = [[(next(values), j) for j in range(len(pool[i]))] for i in range(len(problems))]
    return [pool[i][max(v)[1]] if v else "" for i, v in enumerate(vs)]


# -----------------------------------------------------------------------------
# MCTS over reasoning steps

class Node:
    """A prefix of steps: visits N, total value W, the best (value, solution) through it."""

    def __init__(self, text, finished=False, parent=None):
        self.text, self.finished, self.parent = text, finished, parent
        self.children, self.N, self.W, self.best = [], 0, 0.0, (-1.0, "")


def uct(child, parent_N, c):
    """W/N + c * sqrt(ln N_parent / N): the PARENT's visits in the log (a classic bug)."""
    return child.W / child.N + c * math.sqrt(math.log(parent_N) / child.N)


def select_child(node, c):
    """An unvisited child first (in order of creation), else the child of highest UCT."""
    unvisited = [ch for ch in node.children if ch.N == 0]
    return unvisited[0] if unvisited else max(node.children, key=lambda ch: uct(ch, node.N, c))


def select(root, c):
    """The path from the root down to a node without children (unexpanded, or finished)."""
    path = [root]
    while path[-1].children:
        path.append(select_child(path[-1], c))
    return path


def backup(path, v, solution):
    """N += 1, W += v and the best solution seen on every node of the path (and no other)."""
    for node in path:
        node.N += 1
        node.W += v
        if v > node.best[0]:
            node.best = (v, solution)


def most_visited(root):
    """The best solution at the end of the most-visited path (ties: higher mean value)."""
    node = root
    while node.children:
        node = max(node.children, key=lambda ch: (ch.N, ch.W / max(ch.N, 1)))
    return node.best[1]


def mcts(model, task, problems, scorer, sims, k, c, temperature, seeds, cost):
    """A tree per problem, in lockstep, no PUCT prior; simulation s of problem i samples from
    seed_for(seeds[i], s, j). Returns {s in sims: (most-visited, voted picks, cost.counts(), each
    problem's total tokens so far)}."""
    roots, found, results = [Node("") for _ in problems], [[] for _ in problems], {}
    for s in range(1, max(sims) + 1):
        # 1) select: each tree's path by UCT down to a node without children
        paths = [select(r, c) for r in roots]
        # 2) expand each unfinished leaf by k sampled steps (duplicates merged), to its first child
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
        # 3) roll the path's end out to a solution (unless finished), score it, back it up
        todo = [i for i, path in enumerate(paths) if not path[-1].finished]
        sols = [path[-1].text for path in paths]
        for i, sol in zip(todo, rollouts(model, task, [(problems[i], sols[i]) for i in todo],
                                         [1] * len(todo), temperature,
                                         [seed_for(seeds[i], s, k) for i in todo], cost)):
            sols[i] = sol
        values = scorer([(p, sol, True) for p, sol in zip(problems, sols)], cost)
        for i, (path, v, sol) in enumerate(zip(paths, values, sols)):
            backup(path, v, sol)
            found[i].append((sol, v))
        # 4) after s in sims simulations: the most-visited path's answer, and the weighted vote's
        if s in sims:
            won = [vote([task.extract_answer(t) for t, _ in f], [v for _, v in f]) for f in found]
            voted = [next((t for t, _ in f if task.extract_answer(t) == a), "")
                     for a, f in zip(won, found)]
            results[s] = ([most_visited(r) for r in roots], voted, cost.counts(),
                          [sum(cost.counts(p.question)) for p in problems])
    return results


# -----------------------------------------------------------------------------
# The run: generator, learned scorers, every method at every budget
def method_row(stage, method, scorer, budgets, right, counts, per_problem):
    """A method's metrics row: at each budget, accuracy, rightness and tokens per problem (counts:
    the mean sampled, prompt and scorer tokens), and each problem's total tokens (per_problem)."""
    rounded = lambda xs, places=3: [round(x, places) for x in xs]  # noqa: E731
    sampled, prompt, scored = zip(*counts)
    return {"kind": "method", "stage": stage, "method": method, "scorer": scorer, "budget": budgets,
            "accuracy": [sum(r) / len(r) for r in right], "tokens": rounded(map(sum, counts)),
            "sampled_tokens": rounded(sampled), "prompt_tokens": rounded(prompt),
            "scorer_tokens": rounded(scored), "right_by_budget": right,
            "tokens_by_problem": [rounded(t, 1) for t in per_problem]}

def rightness(task, problems, texts):
    return [float(task.check(p, t)) for p, t in zip(problems, texts)]


def generator_stage(args, task, P, test, out, new_model):
    """The generator's stage: M0 of star.py (or --checkpoint as it is) trained and saved, its
    greedy accuracy and tokens measured: its row."""
    torch.manual_seed(args.seed)
    model = new_model()
    loss = None if args.checkpoint else star.train_start_model(model, task, P, args)
    save_checkpoint(os.path.join(out, "generator.pt"), model, TOKENIZER)
    texts, cost = star.sample(model.eval(), task, test, temperature=0.0,
                              batch_size=args.sample_batch_size, desc="greedy")
    acc = sum(rightness(task, test, [t[0] for t in texts])) / len(test)
    tqdm.write(f"generator: greedy accuracy {acc:.3f}")
    return [{"kind": "greedy", "stage": "generator", "accuracy": acc,
             "difficulty": [p.difficulty for p in test],  # each test problem's number count
             "tokens": (cost.sampled + cost.prompt) / len(test),
             "sampled_tokens": cost.sampled / len(test), "train_loss": loss}]


def labels_stage(model, task, problems, args, out):
    """The generator's samples of P+D, labelled by outcome and by Math-Shepherd, saved: its row."""
    texts, sampled = star.sample(model, task, problems, n=args.samples,
                                 temperature=args.temperature, batch_size=args.sample_batch_size,
                                 seed=seed_for(args.seed, "labels"), desc="samples of P+D")
    labelled = vstar.label(task, problems, texts)
    ms, cost = shepherd_labels(model, task, problems, texts, args, seed_for(args.seed, "rollouts"))
    vstar.save_labelled(os.path.join(out, "labelled.jsonl"), labelled)
    write_jsonl(os.path.join(out, "shepherd.jsonl"), ms)
    right = sum(ok for _, _, ok in labelled) / len(labelled)
    tqdm.write(f"labels: {right:.3f} of {len(labelled)} samples of P+D right")
    return [{"kind": "labels", "stage": "labels", "samples_right": right,
             "samples": len(labelled), "sample_tokens": sampled.sampled,
             "rollout_tokens": cost.sampled}]


def scorers_stage(args, task, P, out, device):
    """The learned recheck on gold and labelled samples, the PRM on Math-Shepherd's labels,
    saved: a row."""
    path = lambda name: os.path.join(out, name)  # noqa: E731
    gold = [(p, c, True) for p, c in star.gold_examples(task, P, with_hints=False)]
    gold += vstar.load_labelled(path("labelled.jsonl"))
    cot = vstar.train_recheck(path("generator.pt"), task, gold, args, device)
    save_checkpoint(path("recheck.pt"), cot, TOKENIZER)
    prm = vstar.train_head(path("generator.pt"),
                           prm_rows(read_jsonl(path("shepherd.jsonl")), args.prm_labels), args,
                           device, "prm", f"PRM ({args.prm_labels} labels)")
    save_checkpoint(path("prm.pt"), prm.gpt, TOKENIZER, extra={"head": prm.head.state_dict()})
    return [{"kind": "scorers", "stage": "scorers"}]


def load_scorers(model, task, out, device):
    """The learned scorers by name, a network's tokens weighted by its size (a PRM by its GPT's)."""
    gpt, ckpt = load_checkpoint(os.path.join(out, "prm.pt"), device)
    prm = ScalarHead(gpt).to(device).eval()
    prm.head.load_state_dict(ckpt["extra"]["head"])
    cot = load_checkpoint(os.path.join(out, "recheck.pt"), device)[0].eval()
    scorers = {"PRM": prm_scorer(prm, task, relative_size(gpt, model)),
               "learned recheck": recheck_scorer(cot, task, relative_size(cot, model)),
               "generator": logprob_scorer(model, task)}
    scorers[PRODUCT] = product_scorer(scorers["learned recheck"], scorers["generator"])
    return scorers


def values_of(scorers, names, items, spent):
    """{name: each item's value} of the named learned scorers, each one's reads counted into
    spent[name]; the product's from its factors' values (not run twice), its reads theirs."""
    value = {name: scorers[name](items, spent[name]) if items else []
             for name in names if name != PRODUCT}
    if PRODUCT in names:
        value[PRODUCT] = [a * b for a, b in zip(*(value[f] for f in FACTORS))]
        for f in FACTORS:
            for key, c in spent[f].by.items():
                spent[PRODUCT].add("scored", c[2], key)
    return value


def evaluate_pool(model, task, test, scorers, budgets, args):
    """Best-of-N, votes and pass@N on one pool of --eval-samples per problem (N samples cost the
    prompt once, N x a sample and a read), at every power of 2 up to it; beside it, each
    problem's difficulty on --bin-samples more samples (read by no method). Returns the scorers'
    quality row, then the methods'."""
    n, learned, mine = args.eval_samples, ("learned recheck", *LEARNED), list(my_share(len(test)))
    # 1) the pool: sample j of problem i from seed_for(seed, "pool", i, j); the learned scorers'
    # values; each problem's tokens sampled, encoded and read; its difficulty on other samples
    cost, spent = TokenCount(), {name: TokenCount() for name in learned}
    texts = samples_of(model, task, test, mine, n, "pool", args, cost)
    flat = [(test[i], t, True) for j, i in enumerate(mine) for t in texts[j * n:(j + 1) * n]]
    value = values_of(scorers, learned, flat, spent)
    probe = difficulty(model, task, test, mine, scorers, args)
    pool = {i: (texts[j * n:(j + 1) * n], {name: v[j * n:(j + 1) * n] for name, v in value.items()},
                (*cost.counts(test[i].question)[:2],
                 {name: spent[name].counts(test[i].question)[2] for name in learned}), probe[i])
            for j, i in enumerate(mine)}
    pool, _ = merge_shares(pool, [])
    # 2) each sample's values, the baselines' too, its rightness and its answer
    texts = [ts for ts, _, _, _ in pool.values()]
    value = {name: [v[name] for _, v, _, _ in pool.values()] for name in learned}
    value["length"] = [[-len(t) for t in ts] for ts in texts]  # baselines: the shortest first,
    value["random"] = [[0.0] * n for _ in texts]                 # and no preference (= one sample)
    right = [[task.check(p, t) for t in ts] for p, ts in zip(test, texts)]
    answers = [[task.extract_answer(t) for t in ts] for ts in texts]
    # 3) each method at every N: exact over the N-subsets (the weighted vote: Monte Carlo)
    ks = sorted({k for k in budgets if k <= n} | {2 ** i for i in range(int(math.log2(n)) + 1)})
    rng = random.Random(seed_for(args.seed, "weighted vote"))
    rights = [right_answers(a, r) for a, r in zip(answers, right)]
    per_k = [vstar.per_problem(right, answers, rights, value, k) for k in ks]  # exact estimators
    by_method = {("majority vote", "-"): [row["majority@k"] for row in per_k],
                 **{("weighted vote", name): [[weighted_vote_accuracy(a, r, k, w, rng) for a, r, w
                                               in zip(answers, right, value[name])] for k in ks]
                    for name in learned},
                 **{("best-of-N", name): [row[f"best-of-k {name}"] for row in per_k]
                    for name in value},
                 ("pass@N", "oracle"): [row["pass@k"] for row in per_k]}
    # 4) the scorers' held-out pair accuracy on the pool, each problem's difficulty (oracle:
    # pass@1 on other samples; predicted: the guides' scorer's mean on them), a row per method
    pairs = {name: vstar.pair_accuracy(right, value[name]) for name in value}
    quality = {"kind": "scorer quality", "stage": "pool",
               **{f"pair_acc {name}": acc for name, (acc, _) in pairs.items()},
               **{f"pair_ties {name}": ties for name, (_, ties) in pairs.items()},
               **prefix_pair_accuracy(task, test, texts, scorers, learned),
               "pass@1 on other samples": [pass1 for _, _, _, (pass1, _) in pool.values()],
               f"mean score {PRODUCT} on other samples": [m for *_, (_, m) in pool.values()]}
    units = [unit for _, _, unit, _ in pool.values()]  # (sampled, prompt, {scorer: read})

    def cost_of(scorer):  # per N: the mean (sampled, prompt, read) tokens, each problem's total
        each = [[(k * s / n, p, k * reads.get(scorer, 0) / n) for s, p, reads in units]
                for k in ks]
        return ([[sum(x[f] for x in e) / len(e) for f in range(3)] for e in each],
                [[sum(x) for x in e] for e in each])
    return [quality] + [method_row("pool", m, s, ks, r, *cost_of(s))
                        for (m, s), r in by_method.items()]


def samples_of(model, task, test, mine, n, stream, args, cost):
    """n samples of each of this process's test problems (indices mine), in batches, counted
    into cost: sample j of problem i from seed_for(run's seed, stream, i, j)."""
    texts, per_batch = [], max(1, args.sample_batch_size // n)
    for c in tqdm(range(0, len(mine), per_batch), desc=f"{stream} samples", leave=False):
        chunk = mine[c:c + per_batch]
        texts += rollouts(model, task, [(test[i], "") for i in chunk], [n] * len(chunk),
                          args.temperature, [seed_for(args.seed, stream, i, j) for i in chunk
                                             for j in range(n)], cost)
    return texts


def difficulty(model, task, test, mine, scorers, args):
    """Snell et al.'s difficulty of each of this process's test problems, on --bin-samples
    samples apart from the pool (uncharged, as theirs): {index: (the share right, its pass@1;
    the mean value by learned recheck x generator, which reads no answer)}."""
    n = args.bin_samples
    texts = samples_of(model, task, test, mine, n, "difficulty", args, TokenCount())
    items = [(test[i], t, True) for j, i in enumerate(mine) for t in texts[j * n:(j + 1) * n]]
    value = values_of(scorers, (*FACTORS, PRODUCT), items, defaultdict(TokenCount))[PRODUCT]
    return {i: (sum(rightness(task, [test[i]] * n, texts[j * n:(j + 1) * n])) / n,
                sum(value[j * n:(j + 1) * n]) / n) for j, i in enumerate(mine)}


def prefix_pair_accuracy(task, test, texts, scorers, names):
    """What a step-level search needs: on the pool's step prefixes (distinct, of this process's
    share of the problems), each scorer's share of (good, bad) prefix pairs of the same problem
    and depth ranked right, a tie 1/2; good: every step so far right and the target reachable
    (the program's exact label). {"prefix_pair_acc NAME": share}, read by no method's count."""
    groups = {}  # (problem, depth) -> [(prefix, exact label)]
    for i in my_share(len(test)):
        for pre in dict.fromkeys(pre for t in texts[i] for pre in vstar.step_prefixes(t)):
            groups.setdefault((i, pre.count("\n")), []).append(
                (pre, all(task.check_steps(test[i], pre))))
    items = [(test[i], pre, False) for (i, _), g in groups.items() for pre, _ in g]
    values = {name: iter(v) for name, v in
              values_of(scorers, names, items, defaultdict(TokenCount)).items()}
    mine = {key: ([ok for _, ok in g], {name: [next(v) for _ in g] for name, v in values.items()})
            for key, g in groups.items()}
    merged, _ = merge_shares({f"{i} {d}": x for (i, d), x in mine.items()}, [])
    right = [r for r, _ in merged.values()]
    return {f"prefix_pair_acc {name}": vstar.pair_accuracy(
        right, [v[name] for _, v in merged.values()])[0] for name in names}


def search_result_rows(stage, methods, name, budgets, task, test, found):
    """The metrics rows of a search's methods (found[b]: {problem: its picks, one per method,
    then its tokens} and the summed token counts, at budgets[b]), and its line of progress."""
    rows = [method_row(stage, m, name, budgets,
                       [rightness(task, test, [a[j] for a in got.values()]) for got, _ in found],
                       [[c / len(test) for c in counts] for _, counts in found],
                       [[a[-1] for a in got.values()] for got, _ in found])
            for j, m in enumerate(methods)]
    tqdm.write(f"{rows[0]['method']} ({name}) at {budgets[-1]}: accuracy "
               f"{rows[0]['accuracy'][-1]:.3f}, {rows[0]['tokens'][-1]:.0f} tokens per problem")
    return rows


def evaluate_beam(model, task, test, name, scorer, budgets, args):
    """The metrics row of beam search guided by `scorer`, run afresh at each budget N, each
    problem's tokens counted apart; problem i's seeds from (run, stage, N, i)."""
    stage, found, mine = f"beam {name}", [], list(my_share(len(test)))
    for N in tqdm(budgets, desc=f"beam search ({name})", leave=False):
        cost = TokenCount()
        texts = beam_search(model, task, [test[i] for i in mine], scorer, N, args.beam_width,
                            args.temperature, [seed_for(args.seed, stage, N, i) for i in mine],
                            cost) if mine else []
        found.append(merge_shares({i: (t, sum(cost.counts(test[i].question)))
                                   for i, t in zip(mine, texts)}, cost.counts()))
    return search_result_rows(stage, ["beam search"], name, budgets, task, test, found)


def evaluate_mcts(model, task, test, name, scorer, budgets, args):
    """The rows of MCTS's picks (most-visited, voted): one search by `scorer`, read at each N;
    problem i's seeds from (run, stage, i)."""
    stage, mine = f"mcts {name}", list(my_share(len(test)))
    res = mcts(model, task, [test[i] for i in mine], scorer, budgets, args.mcts_children,
               args.mcts_c, args.temperature, [seed_for(args.seed, stage, i) for i in mine],
               TokenCount()) if mine else {s: ([], [], [0, 0, 0], []) for s in budgets}
    found = [merge_shares(dict(zip(mine, zip(*res[s][:2], res[s][3]))), res[s][2])
             for s in budgets]
    return search_result_rows(stage, ["MCTS most-visited", "MCTS weighted vote"], name,
                              budgets, task, test, found)

def run(args, task, P, D, test, out, device, new_model):
    """The module docstring's stages in order, each committed at once; reruns skip finished ones."""
    task = task.with_calculator(args.calculator)  # every sample, step and rollout calls it
    finished = committed(out, "stage")
    budgets = [int(b) for b in str(args.budgets).split(",")]

    def stage(name, make_rows, *inputs):  # run a stage not yet committed, then commit its rows
        if name not in finished:
            commit(out, time.time(), *make_rows(*inputs))
    # 1) the generator, its labelled samples of P + D, the learned scorers trained on them
    stage("generator", generator_stage, args, task, P, test, out, new_model)
    model = load_checkpoint(os.path.join(out, "generator.pt"), device)[0].eval()
    stage("labels", labels_stage, model, task, P + D, args, out)
    stage("scorers", scorers_stage, args, task, P, out, device)
    scorers = load_scorers(model, task, out, device)
    # 2) the pool's methods, then beam search and MCTS guided by each scorer
    stage("pool", evaluate_pool, model, task, test, scorers, budgets, args)
    for name in (GUIDES[g] for g in args.guides.split(",")):
        for how, evaluate in (("beam", evaluate_beam), ("mcts", evaluate_mcts)):
            scorer = (oracle_scorer(task, seed_for(args.seed, f"{how} {name}", "ties"))
                      if name == "oracle" else scorers[name])
            stage(f"{how} {name}", evaluate, model, task, test, name, scorer, budgets, args)

# -----------------------------------------------------------------------------
# Report: the equal-compute comparisons, the table and the test-time-scaling plot

def view(r, idx=None):
    """A method row's (tokens per problem at each budget, each budget's per-problem rightness):
    over every test problem, or over those of indices idx."""
    if idx is None:
        return r["tokens"], r["right_by_budget"]
    return ([sum(t[i] for i in idx) / len(idx) for t in r["tokens_by_problem"]],
            [[x[i] for i in idx] for x in r["right_by_budget"]])


def equal_compute_pairs(methods, idx=None, match="tokens"):
    """Each search at its largest budget, paired with best-of-N and the weighted vote by its
    scorer (an oracle-guided one: with pass@N, the pool's ceiling), over every problem or those
    of indices idx (their tokens), at the pool budget N that matches it: match="tokens", the
    smallest N of at least its total compute (the largest if none is: 'pool smaller'); "tokens
    below", the largest N of at most it (the smallest if none is: 'pool larger'); "samples", its
    own N (Snell et al.'s axis: the scorer's reads uncounted). Yields (search, pool row, N's
    index, no N on the asked side, mean, CI)."""
    pool = {(r["method"], r["scorer"]): r for r in methods if r["stage"] == "pool"}
    for r in [s for s in methods if s["stage"] != "pool"]:
        tokens, right = view(r, idx)
        for m in ("best-of-N", "weighted vote"):
            b = pool.get(("pass@N" if r["scorer"] == "oracle" else m, r["scorer"]))
            if b is None or (r["scorer"] == "oracle" and m != "best-of-N"):
                continue
            b_tokens, b_right = view(b, idx)
            if match == "samples":
                j = b["budget"].index(r["budget"][-1]) if r["budget"][-1] in b["budget"] else None
                missing = j is None
            elif match == "tokens below":
                j = max((j for j, t in enumerate(b_tokens) if t <= tokens[-1]), default=None)
                missing, j = j is None, 0 if j is None else j
            else:
                j = next((j for j, t in enumerate(b_tokens) if t >= tokens[-1]), None)
                missing, j = j is None, len(b_tokens) - 1 if j is None else j
            if j is not None:
                yield r, b, j, missing, *paired_difference(right[-1], b_right[j])


def headline_differences(rows):
    """A run's pairs: over every problem at equal total compute (the pool at or above the
    search's tokens, then at or below) and at equal samples; then in each number count and
    oracle level, against best-of-N (or pass@N) at or above its tokens there; the
    compute-optimal choice per group against the best single one at each budget. name -> (mean
    difference, 95% paired CI) (tests/seeds.py)."""
    methods, out = [r for r in rows if r.get("kind") == "method"], {}
    for match, axis in (("tokens", "equal total compute"), ("tokens below", "pool at most its "
                        "tokens"), ("samples", "equal samples")):
        out.update({f"{r['method']} - {b['method']} ({r['scorer']}), {axis}": (mean, ci)
                    for r, b, _, _, mean, ci in equal_compute_pairs(methods, match=match)})
    for title, groups in groupings(rows).items():
        for label, idx in groups.items() if title != "predicted levels" else ():
            out.update({f"{r['method']} - {b['method']} ({r['scorer']}), equal total compute, "
                        f"{label}": (mean, ci) for r, b, _, _, mean, ci in
                        equal_compute_pairs(methods, idx) if b["method"] != "weighted vote"})
        for B, (_, single, _, optimal) in compute_optimal(rows, COMPUTE_BUDGETS, groups).items():
            out[f"compute-optimal by {title} - the best single method, B={B}"] = \
                paired_difference(optimal, single)
    return out


def row_name(r):
    """A row's name in the table and the plot (pass@N: the ceiling of the pool's picks only)."""
    scorer = {"-": "", "oracle": " (oracle-guided)"}.get(r["scorer"], f" ({r['scorer']})")
    return "pass@N (the pool's ceiling)" if r["method"] == "pass@N" else r["method"] + scorer


def table(rows):
    """Returns the markdown report: every method at every budget, then at its largest with leads."""
    kind = {r["kind"]: r for r in rows}
    greedy, lab, quality = kind.get("greedy"), kind.get("labels"), kind.get("scorer quality", {})
    methods = [r for r in rows if r["kind"] == "method"]
    budgets = sorted({b for r in methods for b in r["budget"]})
    # 1) greedy decoding, the scorers' data and held-out quality; every method at every budget
    lines = [f"greedy decoding: accuracy {greedy['accuracy']:.3f} at {greedy['tokens']:.1f} "
             f"tokens per problem ({greedy['sampled_tokens']:.1f} sampled)" if greedy else "",
             "learned scorers trained on {samples} samples of P+D ({samples_right:.3f} right); "
             "Math-Shepherd rollouts: {rollout_tokens} tokens".format(**lab) if lab else "",
             "held-out pair accuracy (ties count 1/2; share tied): " + ", ".join(
                 f"{k[9:]} {v:.3f} ({quality.get('pair_ties ' + k[9:], float('nan')):.0%})"
                 for k, v in quality.items() if k.startswith("pair_acc")),
             "step prefixes ranked right (a reachable one above one that is not, same problem "
             "and depth; ties 1/2): " + ", ".join(f"{k[16:]} {v:.3f}" for k, v in quality.items()
                                                   if k.startswith("prefix_pair_acc")), "",
             "accuracy (total / sampled tokens per problem) at budget N. Total: every token a "
             "network processes (sampled, prompt and prefixes encoded, read by a scorer)", "",
             "| method | " + " | ".join(f"N={b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for r in methods:
        cell = {b: f"{a:.3f} ({t:.0f} / {s:.0f})" for b, a, t, s in
                zip(r["budget"], r["accuracy"], r["tokens"], r["sampled_tokens"])}
        lines.append(f"| {row_name(r)} | " + " | ".join(cell.get(b, "-") for b in budgets) + " |")
    # 2) at each method's largest N: 95% bootstrap intervals, paired (same problems) for leads
    pairs = {(id(r), "weighted vote" if b["method"] == "weighted vote" else "best-of-N"):
             f"N={b['budget'][j]}, {b['tokens'][j]:.0f} tokens"
             f"{', pool smaller' if small else ''}: {with_ci(d, c)}"
             for r, b, j, small, d, c in equal_compute_pairs(methods)}
    majority = next((r for r in methods if r["method"] == "majority vote"), None)
    lines += ["", "at each method's largest N; oracle-guided searches are steered by the ground "
              "truth, pass@N is the ceiling of any pick from the pool", "",
              "| method | N | accuracy (95% CI) | lead over majority vote | lead over best-of-N, "
              "same scorer, equal total compute | lead over the weighted vote, same scorer, "
              "equal total compute |", "|---" * 6 + "|"]
    for r in methods:
        N, last = r["budget"][-1], r["right_by_budget"][-1]
        same_n = majority and majority["budget"][-1] == N and r is not majority
        lead = with_ci(*paired_difference(last, majority["right_by_budget"][-1])) if same_n else "-"
        acc = "{:.3f} ({:.3f} to {:.3f})".format(r["accuracy"][-1], *bootstrap_ci(last))
        cells = [row_name(r), N, acc, lead,
                 *(pairs.get((id(r), m), "-") for m in ("best-of-N", "weighted vote"))]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def levels(values, n=5):
    """Snell et al.'s difficulty levels: the problems ranked by value, highest first (ties by
    index), cut into n quantiles: {level 1 (easiest) .. n: indices}."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    out = {}
    for rank, i in enumerate(order):
        out.setdefault(1 + rank * n // len(values), []).append(i)
    return {level: sorted(idx) for level, idx in sorted(out.items())}


def groupings(rows):
    """The test problems' difficulty groups, {title: {label: indices}}: by number count (known
    before sampling); by the generator's pass@1 on samples apart from the pool (oracle levels:
    they read the answers); by learned recheck x generator's mean value on the same samples
    (predicted levels: they read no answer). An older run's rows lack them: {}."""
    greedy = next((r for r in rows if r.get("kind") == "greedy"), {})
    quality = next((r for r in rows if r.get("kind") == "scorer quality"), {})
    if "pass@1 on other samples" not in quality:
        return {}
    counts = {}
    for i, d in enumerate(greedy["difficulty"]):
        counts.setdefault(f"{d} numbers", []).append(i)
    return {"numbers": dict(sorted(counts.items())),
            "oracle levels": {f"oracle level {k}": idx for k, idx in
                              levels(quality["pass@1 on other samples"]).items()},
            "predicted levels": {f"predicted level {k}": idx for k, idx in
                                 levels(quality[f"mean score {PRODUCT} on other samples"]).items()}}


def group_table(rows, groups):
    """Per group of problems ({label: indices}): each search at its largest N against the pool's
    methods by its scorer at equal compute on those problems (their tokens per problem)."""
    methods, lines = [r for r in rows if r["kind"] == "method"], [
        "| problems | search (scorer) at its largest N | accuracy | tokens per problem | search - "
        "best-of-N, same scorer (95% paired CI) | search - weighted vote, same scorer |",
        "|---" * 6 + "|"]
    for label, idx in groups.items():
        cells = {}  # a row per search, a cell per pool method at the smallest N of >= its tokens
        for r, b, j, small, mean, c in equal_compute_pairs(methods, idx):
            cells.setdefault(id(r), [r])
            cells[id(r)].append(f"{with_ci(mean, c)} at "
                                f"{'pass@' if b['method'] == 'pass@N' else ''}N={b['budget'][j]}"
                                f"{', pool smaller' if small else ''}")
        for r, *vs in cells.values():
            tokens, right = view(r, idx)
            lines.append(f"| {label} ({len(idx)}) | {row_name(r)} | {sum(right[-1]) / len(idx):.3f}"
                         f" | {tokens[-1]:.0f} | " + " | ".join(vs + ["-"] * (2 - len(vs))) + " |")
    return lines


def compute_optimal(rows, budgets, groups):
    """Snell et al.'s compute-optimal strategy: at each compute budget B (tokens per problem),
    the best method and N per group ({label: indices}, its tokens within B there) against the
    best single method and N (within B over every problem), each chosen on the other half of
    the problems (by index parity, both ways: no problem picks its own method). Methods: every
    pool method and search but those that read the answer (pass@N, oracle-guided). Returns
    {B: (single's names, its rightness, the groups' names, their rightness)}."""
    methods = [r for r in rows if r["kind"] == "method" and "oracle" not in r["scorer"]]
    n, out = len(methods[0]["right_by_budget"][0]), {}
    for B in budgets:
        def best(on, within):  # (method, N's index): most right on `on`, its tokens on `within`
            fit = []
            for r in methods:  # its largest N within B
                j = max((j for j, t in enumerate(view(r, within)[0]) if t <= B), default=None)
                fit += [] if j is None else [(r, j)]
            return max(fit, key=lambda rj: sum(rj[0]["right_by_budget"][rj[1]][i] for i in on),
                       default=(None, None))
        single, optimal, names = [None] * n, [None] * n, (set(), set())
        for fold in (0, 1):
            other = [i for i in range(n) if i % 2 != fold]
            r, j = best(other, range(n))
            names[0].add(f"{row_name(r)}, N={r['budget'][j]}" if r else "none")
            for i in range(fold, n, 2):
                single[i] = r and r["right_by_budget"][j][i]
            for label, idx in groups.items():
                r, j = best([i for i in idx if i % 2 != fold], idx)
                names[1].add(f"{label}: {row_name(r)}, N={r['budget'][j]}" if r else
                             f"{label}: none")
                for i in (i for i in idx if i % 2 == fold):
                    optimal[i] = r and r["right_by_budget"][j][i]
        if None not in single and None not in optimal:
            out[B] = (sorted(names[0]), single, sorted(names[1]), optimal)
    return out


def plot(path, task_name, rows, scorer):
    """search.png: panels of accuracy against total tokens per problem (log x), one colour per
    method, guided or picked by `scorer` (solid) or by the exact check (dashed: oracle-guided,
    and pass@N): every problem and each number count in the top row, the oracle levels below."""
    from matplotlib import ticker
    methods, groups = [r for r in rows if r["kind"] == "method"], groupings(rows)
    colour = {"majority vote": "gray", "best-of-N": "C0", "weighted vote": "C1",
              "beam search": "C2", "MCTS most-visited": "C3", "pass@N": "black"}
    shown = [r for r in methods if r["method"] in colour and (
        r["scorer"] in (scorer, "-") or r["method"] == "pass@N" or
        (r["scorer"] == "oracle" and r["method"] == "beam search"))]
    panels = [[("all problems", None)] + list(groups.get("numbers", {}).items()),
              list(groups.get("oracle levels", {}).items())]
    panels = [row for row in panels if row]
    ncols = max(map(len, panels))
    with figure(path, nrows=len(panels), ncols=ncols, squeeze=False,
                figsize=(3.2 * ncols + 0.6, 3.4 * len(panels))) as (fig, axes):
        spare = [ax for ax_row, row in zip(axes, panels) for ax in ax_row[len(row):]]
        for ax in spare:
            ax.axis("off")
        for ax_row, row in zip(axes, panels):
            for ax, (title, idx) in zip(ax_row, row):
                for r in shown:
                    tokens, right = view(r, idx)
                    oracle = r["scorer"] == "oracle"
                    ax.plot(tokens, [sum(x) / len(x) for x in right], color=colour[r["method"]],
                            ls="--" if oracle else "-", marker="s" if oracle else "o", ms=3,
                            label=row_name(r))
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 3)))
                ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
                ax.set(title=f"{title} ({len(view(shown[0], idx)[1][0])})",
                       xlabel="tokens per problem (all networks)")
                ax.grid(alpha=0.3)
            ax_row[0].set_ylabel("test accuracy")
        if spare:  # the legend in an empty panel, else beside the last of the top row
            spare[0].legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="center")
        else:
            axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"test-time search on {task_name}, by {scorer} (dashed: the exact check); "
                     "oracle level 1: the easiest fifth by the generator's pass@1", fontsize=10)


def report(args, rows):
    """search.png, and the markdown report it returns: the table over every problem, then per
    number count, oracle level and predicted level (an older run's rows lack them: the first)."""
    guides = [GUIDES[g] for g in args.guides.split(",") if g != "oracle"]
    plot(os.path.join(args.out, "search.png"), args.task, rows, (guides or [PRODUCT])[0])
    lines, groups = [table(rows)], groupings(rows)
    for title, g in groups.items():
        lines += ["", f"by {title} (their tokens per problem):", ""] + group_table(rows, g)
    if groups:
        lines += ["", "compute-optimal (Snell et al.): at most B tokens per problem, the best "
                  "method and N per group against the best single method and N, each chosen on "
                  "the other half of the test problems", "",
                  "| B | groups | best single method | accuracy | best per group | accuracy | "
                  "difference (95% paired CI) |", "|---" * 7 + "|"]
        for title, g in groups.items():
            for B, (one, a, many, b) in compute_optimal(rows, COMPUTE_BUDGETS, g).items():
                lines.append(f"| {B} | {title} | {' / '.join(one)} | {sum(a) / len(a):.3f} | "
                             f"{'; '.join(many)} | {sum(b) / len(b):.3f} | "
                             f"{with_ci(*paired_difference(b, a))} |")
    return "\n".join(lines)
