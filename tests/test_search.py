"""
Guards search.py: on a toy model and task whose right path is known, beam search and MCTS find
it; UCT tries every unvisited child first and puts the PARENT's count in its log; backup touches
the path and nothing else; beam pruning keeps exactly the best distinct prefixes; every method's
token count is exact, a scorer's forward passes included (both of a product's; a network of
another size in proportion), and the pool charges N samples and N scorer passes; the oracle's
ties break at random, the same in any batch; the equal-compute pairs pick the right pool budget,
per group by its problems' tokens; Snell et al.'s difficulty levels; the compute-optimal choice
per group is made on the other half, within the budget on that group;
the vote's tie rule and its treatment of unparsable answers (common.vote); the shared-prefix
sampler (star.continue_prefixes) equals the naive one, and a seeded row depends on no other row
(what torchrun needs); the run end to end, resumed without redoing a stage.

Run: python -m pytest tests/test_search.py
"""

import argparse
import math
import os
import random

import pytest
import torch
import torch.nn as nn

import common
import search
import star
import train
import vstar
from common import read_jsonl
from model import GPT, GPTConfig, ScalarHead, generate_naive
from tasks import EOT, NEWLINE, NOT_TEXT, PAD, Problem, Task, decode, encode, get_task
from tasks.base import split_lines

GOLD = ["b", "c", "a"]  # the toy's one right path


class PathTask(Task):
    """Three steps, each a letter a/b/c, then "A: 1"; right only along GOLD."""
    name = "path"

    def check(self, p, text):
        return split_lines(text) == GOLD + ["A: 1"]

    def check_steps(self, p, text):
        lines = split_lines(text)
        return [(k < 3 and line == GOLD[k]) or (k == 3 and self.check(p, text))
                for k, line in enumerate(lines)]

    def extract_answer(self, text):
        lines = split_lines(text)
        return ";".join(lines) if lines[-1] == "A: 1" else None


class ToyLM(nn.Module):
    """A language model that is a program of its prefix: at a step, a uniform choice of a/b/c
    then a newline; after three steps "A: 1" and end-of-text. Every step line is 2 tokens and
    the answer line 5, so token counts are known exactly. It keeps the token ids it has seen in
    the KV cache (one layer, one head, width 1), so cache copies carry the history along."""

    def __init__(self):
        super().__init__()
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=1, block_size=96)
        self.dummy = nn.Parameter(torch.zeros(1))

    def next_logits(self, ids):
        logits = torch.full((100,), -1e9)
        text = decode([t for t in ids if t != PAD])
        if "\n" not in text:  # still inside the prompt: never sampled from
            return logits
        lines = text.split("\n", 1)[1].split("\n")
        depth, cur = len(lines) - 1, lines[-1]
        if depth < 3:
            for ch in (["a", "b", "c"] if cur == "" else ["\n"]):
                logits[encode(ch)[0]] = 0.0
        else:
            answer = "A: 1"
            logits[encode(answer[len(cur)])[0] if len(cur) < len(answer) else EOT] = 0.0
        return logits

    def forward(self, idx, pos=None, mask=None, cache=None, return_hidden=False):
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        hist = idx
        if cache is not None:
            k = idx.float().view(B, 1, T, 1)
            hist = cache.update(0, k, k)[0][:, 0, :, 0].long()  # (B, start + T)
            cache.pos += T
        return torch.stack([torch.stack([self.next_logits(hist[b, :start + t + 1].tolist())
                                         for t in range(T)]) for b in range(B)])


P0 = Problem(question="path", answer="1", difficulty=1)
TASK = PathTask()
RIGHT = "b\nc\na\nA: 1"


def test_beam_search_finds_the_known_path():
    # keep = 24 // 24 = 1: the right prefix gets all 24 samples each round; all 24 miss the right
    # letter with probability (2/3)^24 = 6e-5 per round, so a seed fails with p < 2e-4
    for seed in range(3):
        chosen = search.beam_search(ToyLM(), TASK, [P0], search.oracle_scorer(TASK), N=24, M=24,
                                    temperature=1.0, seeds=[seed], cost=common.TokenCount())
        assert chosen == [RIGHT]


def test_mcts_finds_the_known_path():
    # A node is expanded once, so a seed fails when the 20 samples of a node on the path all
    # miss its right letter: 3 * (2/3)^20 = 1e-3 (measured: 1 failure in 200 seeds; with 6
    # samples per expansion, 46 in 200, as 3 * (2/3)^6 predicts)
    for seed in range(3):
        res = search.mcts(ToyLM(), TASK, [P0], search.oracle_scorer(TASK), [40], k=20, c=1.0,
                          temperature=1.0, seeds=[seed], cost=common.TokenCount())
        most_visited, voted, *_ = res[40]
        assert most_visited == [RIGHT] and voted == [RIGHT]


def test_uct_tries_every_unvisited_child_before_revisiting_one():
    root = search.Node("")
    root.children = [search.Node(t, True, root) for t in ("x", "y", "z")]
    seen = []
    for _ in range(3):
        path = search.select(root, c=1.0)
        seen.append(path[-1].text)
        search.backup(path, 1.0 if path[-1].text == "x" else 0.0, path[-1].text)
    assert seen == ["x", "y", "z"]  # x scored 1 first, yet y and z are tried before x again
    assert search.select(root, c=1.0)[-1].text == "x"


def test_uct_uses_the_parents_count_in_the_log():
    root, node = search.Node(""), search.Node("n\n")
    a, b = search.Node("n\na\n", parent=node), search.Node("n\nb\n", parent=node)
    root.children, node.children, node.parent = [node], [a, b], root
    root.N, node.N = 1000, 7
    a.N, a.W, b.N, b.W = 5, 4.0, 1, 0.0
    assert search.uct(a, 7, 1.0) == pytest.approx(0.8 + math.sqrt(math.log(7) / 5))
    assert search.select(root, c=1.0) == [root, node, a]
    # the root's count in the log would have picked b: the test tells the two apart
    assert search.uct(b, root.N, 1.0) > search.uct(a, root.N, 1.0)
    # and on random nodes, the choice is the argmax of the formula with the parent's count
    rng = random.Random(0)
    for _ in range(300):
        node = search.Node("")
        node.children = [search.Node(str(j), parent=node) for j in range(rng.randint(2, 5))]
        for ch in node.children:
            ch.N = rng.randint(1, 20)
            ch.W = rng.uniform(0, ch.N)
        node.N = sum(ch.N for ch in node.children) + rng.randint(1, 50)
        c = rng.uniform(0.5, 2.0)
        hand = max(node.children,
                   key=lambda ch: ch.W / ch.N + c * math.sqrt(math.log(node.N) / ch.N))
        assert search.select_child(node, c) is hand


def test_backup_updates_the_path_and_nothing_else():
    root = search.Node("")
    a, b = search.Node("a\n", parent=root), search.Node("b\n", parent=root)
    a1, a2 = search.Node("a\na\n", parent=a), search.Node("a\nb\n", parent=a)
    root.children, a.children = [a, b], [a1, a2]
    for n, (N, W) in zip([root, a, b, a1, a2], [(5, 2.0), (3, 1.0), (2, 1.0), (1, 0.0), (1, 1.0)]):
        n.N, n.W = N, W
    before = {id(n): (n.N, n.W, n.best) for n in (root, a, b, a1, a2)}
    search.backup([root, a, a2], 0.5, "sol")
    for n in (root, a, a2):
        N, W, _ = before[id(n)]
        assert (n.N, n.W, n.best) == (N + 1, W + 0.5, (0.5, "sol"))
    for n in (b, a1):
        assert (n.N, n.W, n.best) == before[id(n)]


def test_prune_keeps_exactly_the_best_distinct_prefixes():
    cands = ["a\n", "b\n", "a\n", "c\n", "d\n", "b\n"]
    scores = [0.7, 0.9, 0.7, 0.1, 0.8, 0.9]
    assert search.prune(cands, scores, 3) == ["b\n", "d\n", "a\n"]
    assert search.prune(cands, scores, 10) == ["b\n", "d\n", "a\n", "c\n"]  # no duplicates
    assert search.refill(3, 8) == [3, 3, 2] and search.refill(1, 4) == [4]


def test_beam_search_keeps_the_top_and_never_two_identical_prefixes(monkeypatch):
    calls, prune = [], search.prune

    def spy(cands, scores, keep):
        kept = prune(cands, scores, keep)
        calls.append((cands, scores, keep, kept))
        return kept
    monkeypatch.setattr(search, "prune", spy)
    # a scorer that prefers later letters, so that pruning has something to choose
    score = lambda items, cost: [sum(map(ord, t)) / 1000 for _, t, _ in items]  # noqa: E731
    search.beam_search(ToyLM(), TASK, [P0, P0], score, N=8, M=4, temperature=1.0,
                       seeds=[0, 1], cost=common.TokenCount())
    assert calls
    for cands, scores, keep, kept in calls:
        assert keep == 8 // 4  # N // M survive
        assert len(set(kept)) == len(kept) == min(keep, len(set(cands)))
        best = sorted(set(cands), key=lambda c: -dict(zip(cands, scores))[c])[:keep]
        assert sorted(dict(zip(cands, scores))[c] for c in kept) == \
            sorted(dict(zip(cands, scores))[c] for c in best)


def test_token_accounting_is_exact():
    model, line, answer = ToyLM(), 2, 5
    whole = 3 * line + answer  # 11 tokens per solution
    prompt = len(encode(TASK.prompt(P0)))
    # best-of-N's pool: n samples, the shared prompt encoded once
    cost = common.TokenCount()
    search.rollouts(model, TASK, [(P0, "")], [7], 1.0, list(range(7)), cost)
    assert (cost.sampled, cost.prompt) == (7 * whole, prompt)
    # beam search: N steps sampled every round, every solution ends together; the oracle is a
    # program and reads no tokens
    for N, M in ((8, 4), (6, 2)):
        cost = common.TokenCount()
        search.beam_search(model, TASK, [P0, P0], search.oracle_scorer(TASK, tie_seed=1), N, M,
                           1.0, [0, 1], cost)
        assert cost.sampled == 2 * N * whole and cost.scored == 0
    # MCTS is anytime: its count after fewer simulations is a prefix of the same search's
    k, cost = 3, common.TokenCount()
    res = search.mcts(model, TASK, [P0], search.oracle_scorer(TASK), [1, 5, 9], k, 1.0, 1.0,
                      [0], cost)
    assert res[9][2] == cost.counts() and 0 < res[1][2][0] < res[5][2][0] <= res[9][2][0]
    assert res[9][3] == [sum(cost.counts())]  # the one problem's tokens: all of them
    assert all(res[s][2][1] > 0 for s in (1, 5, 9))  # every prefix re-read is counted


def test_mcts_token_count_matches_its_tree(monkeypatch):
    made = []
    init = search.Node.__init__

    def record(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(search.Node, "__init__", record)
    k, cost = 3, common.TokenCount()
    search.mcts(ToyLM(), TASK, [P0], search.oracle_scorer(TASK), [12], k, 1.0, 1.0, [1], cost)
    expected = 0
    for n in made:
        if n.children:  # expanded once: k samples of a line, then one rollout of child 0
            d = n.text.count("\n")
            expected += k * (2 if d < 3 else 5)
            if not n.children[0].finished:
                expected += 2 * (3 - (d + 1)) + 5
    assert cost.sampled == expected


def tiny_gpt(seed, n_embd=16):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=n_embd, block_size=64)).eval()


def count_reads(monkeypatch, module):
    """An independent count of the tokens each scorer network reads: the prompt and completion
    tokens of every row handed to sequence_logprobs (by `module`), per network."""
    seen, real = {}, module.sequence_logprobs

    def spy(model, prompts, completions, *a, **kw):
        seen[model] = seen.get(model, 0) + sum(len(p) + len(c) for p, c in
                                               zip(prompts, completions))
        return real(model, prompts, completions, *a, **kw)
    monkeypatch.setattr(module, "sequence_logprobs", spy)
    return seen


def count_generator(monkeypatch):
    """The generator's prefill and sampled tokens, counted where star.continue_prefixes (search's
    sampler) calls model.generate."""
    seen = {"prompt": 0, "sampled": 0}
    real = star.generate

    def spy(model, prompts, *a, **kw):
        out = real(model, prompts, *a, **kw)
        seen["prompt"] += sum(map(len, prompts))
        seen["sampled"] += int(out[2].sum())
        return out
    monkeypatch.setattr(star, "generate", spy)
    return seen


@pytest.mark.parametrize("how", ["beam", "mcts"])
def test_a_scorers_forward_passes_count_in_the_search_compute(monkeypatch, how):
    # ToyLM samples (several rounds of steps); two tiny random GPTs score, one of them a
    # network of another size, whose tokens count in proportion to its parameters
    a, b = tiny_gpt(0), tiny_gpt(1, n_embd=32)
    w = common.relative_size(b, a)
    assert w > 2  # wider: about four times the parameters per layer
    reads, gen = count_reads(monkeypatch, vstar), count_generator(monkeypatch)
    both, calls = search.product_scorer(search.logprob_scorer(a, TASK),
                                        search.logprob_scorer(b, TASK, w)), []
    scorer = lambda items, cost: calls.append(1) or both(items, cost)  # noqa: E731
    cost = common.TokenCount()
    if how == "beam":
        search.beam_search(ToyLM(), TASK, [P0, P0], scorer, 6, 2, 1.0, [0, 1], cost)
    else:
        search.mcts(ToyLM(), TASK, [P0], scorer, [8], 3, 1.0, 1.0, [0], cost)
    assert len(calls) >= 4 and reads[a] > 0  # each scorer called every round, not only at the end
    assert reads[a] == reads[b]  # both read the same items
    assert (cost.sampled, cost.prompt) == (gen["sampled"], gen["prompt"])
    assert cost.scored == pytest.approx(reads[a] + w * reads[b])
    assert sum(cost.counts()) == pytest.approx(
        gen["sampled"] + gen["prompt"] + reads[a] + w * reads[b])


def test_the_recheck_and_the_prm_count_the_rows_they_read(monkeypatch):
    task = get_task("countdown")
    p = Problem(question="3 4 5 T: 27", answer="27", difficulty=3, data=((3, 4, 5), 27))
    items = [(p, "5+4=9\n9*3=27\nA: 27", True), (p, "5+4=9\n", False),
             (p, "garbage", True), (p, "5*4=20\n", False)]
    verifier, reads = tiny_gpt(2), count_reads(monkeypatch, vstar)
    cost = common.TokenCount()
    search.recheck_scorer(verifier, task)(items, cost)
    rows = vstar.recheck_rows(task, *zip(*items))
    assert rows[2] is None  # not a step: the recheck reads nothing of it, and scores it 0
    assert cost.scored == sum(len(q) + len(c) for st in rows for q, c in st or ()) == \
        reads[verifier]
    prm, cost = ScalarHead(tiny_gpt(3)).eval(), common.TokenCount()
    seen = []
    prm.register_forward_hook(
        lambda m, args, out: seen.append(sum(len(q) + len(c) for q, c in zip(*args[:2]))))
    search.prm_scorer(prm, task)(items, cost)
    by_hand = sum(len(encode(task.prompt(p))) + len(encode(t)) + fin for p, t, fin in items)
    assert cost.scored == sum(seen) == by_hand


def test_pool_costs_the_prompt_once_and_n_samples_and_scorer_passes():
    # ToyLM's solutions are 11 tokens (end-of-text included); a scorer reads prompt + 11
    gpt, P = tiny_gpt(0), len(encode(TASK.prompt(P0)))
    scorers = {name: search.logprob_scorer(gpt, TASK) for name in ("learned recheck", "PRM",
                                                                   "generator")}
    scorers[search.PRODUCT] = search.product_scorer(scorers["learned recheck"],
                                                    scorers["generator"])
    args = argparse.Namespace(eval_samples=4, bin_samples=2, sample_batch_size=8, temperature=1.0,
                              seed=0)
    P1 = Problem(question="walk", answer="1", difficulty=1)  # the same prompt length as P0
    rows = search.evaluate_pool(ToyLM(), TASK, [P0, P1], scorers, [1, 2, 4], args)
    row = {(r["method"], r["scorer"]): r for r in rows[1:]}
    for (method, scorer), r in row.items():
        reads = {"-": 0, "oracle": 0, "length": 0, "random": 0, search.PRODUCT: 2}.get(scorer, 1)
        assert r["sampled_tokens"] == [k * 11 for k in (1, 2, 4)]
        assert r["prompt_tokens"] == [P] * 3
        assert r["tokens"] == [k * 11 + P + reads * k * (P + 11) for k in (1, 2, 4)], (method,
                                                                                        scorer)
        assert len(r["right_by_budget"]) == 3 and all(len(x) == 2 for x in r["right_by_budget"])
        assert r["tokens_by_problem"] == [[t, t] for t in r["tokens"]]  # each problem's apart
    assert len(rows[0]["pass@1 on other samples"]) == 2  # the oracle levels' difficulty
    for name in search.LEARNED:  # the like-for-like baselines of every learned-guided search
        assert ("best-of-N", name) in row and ("weighted vote", name) in row


def test_oracle_ties_break_at_random_the_same_in_any_batch():
    items = [(P0, RIGHT, True), (P0, "a\nb\nc\nA: 1", True), (P0, "b\n", False), (P0, "a\n", False),
             (P0, "c\n", False)]
    cost = common.TokenCount()
    plain = search.oracle_scorer(TASK)(items, cost)
    assert plain == [1.0, 0.0, 1.0, 0.0, 0.0]
    tied = search.oracle_scorer(TASK, tie_seed=7)(items, cost)
    assert [round(v) for v in tied] == plain and len(set(tied)) == len(tied)
    assert search.oracle_scorer(TASK, tie_seed=7)(items[::-1], cost) == tied[::-1]  # any order
    assert cost.scored == 0  # a program: no network tokens
    # which of the two tied wrong steps survives depends on the seed, not on their order
    kept = {search.prune(["a\n", "c\n"], search.oracle_scorer(TASK, s)(items[3:], cost), 1)[0]
            for s in range(20)}
    assert kept == {"a\n", "c\n"}


def test_equal_compute_pairs_pick_the_smallest_pool_budget_at_or_above_the_search():
    def row(stage, method, scorer, tokens, right):
        return search.method_row(stage, method, scorer, [1, 2, 4][:len(tokens)], right,
                                 [(t, 0, 0) for t in tokens], [[t, t] for t in tokens])
    pool = row("pool", "best-of-N", "PRM", [10, 20, 40], [[0, 0], [0, 1], [1, 1]])
    vote = row("pool", "weighted vote", "PRM", [10, 20, 40], [[0, 0], [0, 0], [0, 1]])
    beam = row("beam PRM", "beam search", "PRM", [8, 15], [[0, 0], [1, 1]])
    big = row("mcts PRM", "MCTS most-visited", "PRM", [50], [[1, 0]])
    oracle = row("beam oracle", "beam search", "oracle", [12], [[1, 1]])
    ceiling = row("pool", "pass@N", "oracle", [10, 20, 40], [[1, 1]] * 3)
    rows = [pool, vote, beam, big, oracle, ceiling]
    got = [(r["method"], b["method"], b["budget"][j], smaller, d) for r, b, j, smaller, d, _ in
           search.equal_compute_pairs(rows)]
    assert got == [("beam search", "best-of-N", 2, False, 0.5),  # 20 is the first >= 15
                   ("beam search", "weighted vote", 2, False, 1.0),
                   ("MCTS most-visited", "best-of-N", 4, True, -0.5),  # none >= 50: the largest
                   ("MCTS most-visited", "weighted vote", 4, True, 0.0),
                   ("beam search", "pass@N", 2, False, 0.0)]  # oracle-guided: the ceiling's
    # the other sides: the largest pool N at or below its tokens; the same N (equal samples)
    below = [(r["method"], b["method"], b["budget"][j], missing) for r, b, j, missing, _, _ in
             search.equal_compute_pairs(rows, match="tokens below")]
    assert below[0] == ("beam search", "best-of-N", 1, False)  # 10 <= 15 < 20
    assert below[2] == ("MCTS most-visited", "best-of-N", 4, False)
    same = [(r["method"], b["budget"][j]) for r, b, j, _, _, _ in
            search.equal_compute_pairs(rows, match="samples")]
    assert same[0] == ("beam search", 2) and same[2] == ("MCTS most-visited", 1)
    assert len(search.headline_differences(rows)) == 15
    text = search.table(rows)
    assert "pool smaller" in text and "pass@N (the pool's ceiling)" in text
    assert "beam search (oracle-guided)" in text and "upper bound" not in text


def by_counts(stage, method, scorer, right, tokens):
    """A method row over 4 problems, numbers 2 2 3 3 (indices 0 1 2 3); tokens: {count: per
    budget}, the overall their mean."""
    budgets = [1, 2, 4][:len(right)]
    mean = [(a + b) / 2 for a, b in zip(tokens[2], tokens[3])]
    return search.method_row(stage, method, scorer, budgets, right, [(t, 0, 0) for t in mean],
                             [[a, a, b, b] for a, b in zip(tokens[2], tokens[3])])


GREEDY = {"kind": "greedy", "accuracy": 0.0, "tokens": 1, "sampled_tokens": 1,
          "difficulty": [2, 2, 3, 3]}
QUALITY = {"kind": "scorer quality", "pass@1 on other samples": [0.9, 0.1, 0.5, 0.0],
           f"mean score {search.PRODUCT} on other samples": [0.2, 0.4, 0.3, 0.1]}
COUNTS = {"2 numbers": [0, 1], "3 numbers": [2, 3]}


def test_difficulty_levels_are_quantiles_of_pass_at_1_easiest_first():
    assert search.levels([0.9, 0.1, 0.5, 0.0, 0.5], n=5) == {1: [0], 2: [2], 3: [4], 4: [1],
                                                            5: [3]}  # ties: by index
    assert search.levels([0.0] * 4 + [1.0] * 6, n=5) == {1: [4, 5], 2: [6, 7], 3: [8, 9],
                                                        4: [0, 1], 5: [2, 3]}
    groups = search.groupings([GREEDY, QUALITY])
    assert groups["numbers"] == COUNTS
    assert groups["oracle levels"] == {"oracle level 1": [0], "oracle level 2": [2],
                                       "oracle level 3": [1], "oracle level 4": [3]}
    assert list(groups["predicted levels"].values()) == [[1], [2], [0], [3]]  # no answer read
    assert search.groupings([GREEDY]) == {}  # an older run's rows: no groups


def test_equal_compute_pairs_by_number_count_use_that_counts_tokens():
    # the beam spends 30 tokens a 2-number problem and 90 a 3-number one; the pool's N=2 costs
    # 40 and 80, N=4 costs 80 and 160: at 2 numbers N=2 matches it, at 3 numbers N=4
    pool = by_counts("pool", "best-of-N", "PRM", [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]],
                     {2: [20, 40, 80], 3: [40, 80, 160]})
    beam = by_counts("beam PRM", "beam search", "PRM", [[1, 1, 0, 0]], {2: [30], 3: [90]})
    rows = [GREEDY, QUALITY, pool, beam]
    got = {d: [(b["budget"][j], mean) for _, b, j, _, mean, _ in
               search.equal_compute_pairs([pool, beam], idx)]
           for d, idx in search.groupings(rows)["numbers"].items()}
    assert got == {"2 numbers": [(2, 0.5)], "3 numbers": [(4, -0.5)]}  # (1, 1) vs (1, 0) etc.
    lines = search.group_table(rows, COUNTS)
    assert lines[2].startswith("| 2 numbers (2) | beam search (PRM) | 1.000 | 30 | +0.500 (") \
        and lines[2].endswith(") at N=2 | - |") and len(lines) == 4
    # one problem's group: its own tokens (problem 3 at 90, the pool's N=4 at 160)
    assert [b["budget"][j] for _, b, j, *_ in search.equal_compute_pairs([pool, beam], [3])] == [4]
    names = search.headline_differences(rows)
    assert "beam search - best-of-N (PRM), equal total compute, 3 numbers" in names
    assert "beam search - best-of-N (PRM), equal total compute, oracle level 4" in names


def test_compute_optimal_picks_per_count_on_the_other_half():
    # A is right on every 2-number problem, B on every 3-number one; both cost 10 tokens. The
    # best single method gets half of them; the best per count gets all, each picked on the
    # other half. C is right on every problem but costs 100: out of a budget of 50.
    a = by_counts("pool", "best-of-N", "PRM", [[1, 1, 0, 0]], {2: [10], 3: [10]})
    b = by_counts("pool", "weighted vote", "PRM", [[0, 0, 1, 1]], {2: [10], 3: [10]})
    c = by_counts("beam PRM", "beam search", "PRM", [[1, 1, 1, 1]], {2: [100], 3: [100]})
    oracle = by_counts("beam oracle", "beam search", "oracle", [[1, 1, 1, 1]], {2: [1], 3: [1]})
    got = search.compute_optimal([GREEDY, a, b, c, oracle], (50, 200), COUNTS)
    one, single, many, optimal = got[50]
    assert sum(single) == 2 and optimal == [1, 1, 1, 1]  # the oracle-guided one never picked
    assert many == ["2 numbers: best-of-N (PRM), N=1", "3 numbers: weighted vote (PRM), N=1"]
    assert got[200][1] == [1, 1, 1, 1] and got[200][0] == ["beam search (PRM), N=1"]
    # a budget binds per group: D fits 50 on 2-number problems (30) but not on 3-number (90)
    d = by_counts("beam PRM", "beam search", "PRM", [[1, 1, 1, 1]], {2: [30], 3: [90]})
    one, single, many, optimal = search.compute_optimal([GREEDY, b, d], (50,), COUNTS)[50]
    assert many == ["2 numbers: beam search (PRM), N=1", "3 numbers: weighted vote (PRM), N=1"]
    assert optimal == [1, 1, 1, 1] and single == [0, 0, 1, 1]  # over all problems D costs 60
    # E is right on the even problems, O on the odd ones: a half picks the method best on the
    # other half, wrong on its own (chosen on the problems it is scored on, both would score 1)
    e = by_counts("pool", "majority vote", "-", [[1, 0, 1, 0]], {2: [5], 3: [5]})
    o = by_counts("pool", "best-of-N", "length", [[0, 1, 0, 1]], {2: [5], 3: [5]})
    _, single, _, optimal = search.compute_optimal([GREEDY, e, o], (50,), COUNTS)[50]
    assert single == optimal == [0, 0, 0, 0]

def test_majority_vote_tie_rule_and_unparsable_answers():
    assert common.vote(["x", "y", "y", "x"]) == "x"  # a tie goes to the answer seen first
    assert common.vote(["y", "x", "x", "y"]) == "y"
    assert common.vote(["x", "y"], [0.5, 0.5]) == "x"
    assert common.vote(["x", "y", "y"], [0.9, 0.3, 0.3]) == "x"  # weights, not counts
    assert common.vote([None, None, None, "x"]) == "x"  # unparsable answers cast no vote
    assert common.vote([None, "x"], [10.0, 0.1]) == "x"
    assert common.vote([None, None]) is None
    # a pool where every subset has only unparsable answers or one wrong one: never right
    assert common.weighted_vote_accuracy([None, None, "w"], [True, True, False], 2,
                                         [5.0, 5.0, 0.1], random.Random(0)) == 0.0


def test_seeded_continuations_depend_on_no_other_row():
    # what lets torchrun split the problems: search samples row r from seeds[r], and gives each
    # prefix all the room the block leaves it, so a row is the same in any batch or process
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    with torch.no_grad():  # large weights, so the rows really differ
        for p in model.parameters():
            p.normal_(0, 0.5) if p.dim() >= 2 else None
    prefixes, copies, seeds = [[5, 6, 7, 8, 9], [10] * 58, [10, 11]], [3, 1, 2], [4, 8, 15, 1, 6, 2]
    cost = common.TokenCount()
    rows = star.continue_prefixes(model, prefixes, copies, 12, (), 1.0, seeds, cost)
    assert [len(r) for r in rows] == [12, 12, 12, 6, 12, 12]  # no stop token: each its own room
    assert cost.sampled == 66 and cost.prompt == 5 + 58 + 2
    tokens, _, lengths = generate_naive(model, [prefixes[0], prefixes[2]], 12, (), PAD, 1.0,
                                        banned_tokens=NOT_TEXT, seeds=[4, 8, 15, 6, 2],
                                        copies=[3, 2])
    assert rows[:3] + rows[4:] == tokens.tolist()
    for u, at in ((0, 0), (1, 3), (2, 4)):  # each prefix alone: the same rows
        alone = star.continue_prefixes(model, [prefixes[u]], [copies[u]], 12, (), 1.0,
                                       seeds[at:at + copies[u]], common.TokenCount())
        assert alone == rows[at:at + copies[u]]


@pytest.mark.slow
class ArithToy(ToyLM):
    """A language model that always writes "7+5=0" then "A: 12": its own arithmetic is wrong,
    so a right result in its text is the calculator's."""

    def next_logits(self, ids):
        logits = torch.full((100,), -1e9)
        text = decode([t for t in ids if t != PAD])
        if "\n" not in text:
            return logits
        lines = text.split("\n", 1)[1].split("\n")
        line, cur = ("7+5=0", "A: 12")[min(len(lines) - 1, 1)], lines[-1]
        if cur != line and line.startswith(cur):
            logits[encode(line[len(cur)])[0]] = 0.0
        else:
            logits[NEWLINE if len(lines) == 1 else EOT] = 0.0
        return logits


@pytest.mark.parametrize("calculator,line", [("result", "7+5=12"), ("off", "7+5=0")])
def test_every_sampler_writes_the_calculators_results(calculator, line):
    # The pool and the generators' samples (star.sample), search's steps and rollouts (also
    # Math-Shepherd's) all call it; "off" leaves the model's own arithmetic.
    task = get_task("countdown").with_calculator(calculator)
    p, cost, toy = task.problem((7, 5), 12), common.TokenCount(), ArithToy()
    texts, count = star.sample(toy, task, [p], n=2, temperature=1.0)
    assert texts == [[f"{line}\nA: 12"] * 2]
    assert count.sampled == 2 * (len(encode(f"{line}\nA: 12")) + 1)  # the tool's tokens too
    assert search.sample_steps(toy, task, [(p, "")], [2], 1.0, [0, 1], cost) == [(line, False)] * 2
    assert search.rollouts(toy, task, [(p, "")], [1], 1.0, [0], cost) == [f"{line}\nA: 12"]


def test_tool_written_marks_exactly_what_the_calculator_wrote():
    from tasks.countdown import CountdownTraces
    task = get_task("countdown").with_calculator("result")
    p, text = task.problem((7, 5, 2), 24), "7+5=12\n12*2=24\nA: 24"
    written = star.tool_written(task, p, text)
    assert "".join(ch for ch, w in zip(text, written) if w) == "12\n24\n"
    assert sum(star.tool_written(task, p, "7+5=1")) == 1  # a row cut in the tool's writing
    assert not any(star.tool_written(get_task("countdown"), p, text))  # no tool: the model's
    # A judge writes "=" itself (the found path at the goal): those are not the model's triggers.
    traces = CountdownTraces("judge")
    q, text, by_tool = traces.problem((11, 3, 7), 32), "", 0
    for step in ("7*3=", "\n 21+11="):
        answer = traces.tool(q, text + step)
        text, by_tool = text + step + answer, by_tool + len(answer)
    assert text.endswith("7*3=21\n21+11=32\nA: 32") and sum(star.tool_written(traces, q, text)) \
        == by_tool


def test_search_runs_end_to_end_and_resumes(tmp_path, monkeypatch, sampler_tools):
    # an untrained generator writes garbage to the end of every budget: keep the budgets short
    monkeypatch.setattr(search, "ROLLOUT_TOKENS", 32)
    monkeypatch.setattr(search, "STEP_TOKENS", 12)
    tools = sampler_tools
    out = str(tmp_path / "run")
    argv = ["--method", "search", "--out", out, "--n-train", "6", "--n-unlabeled", "2",
            "--n-test", "3", "--steps", "2", "--verifier-steps", "2", "--eval-samples", "2",
            "--budgets", "1,2", "--samples", "2", "--rollouts", "2", "--batch-size", "4",
            "--train-difficulty", "2", "--test-difficulty", "2", "--calculator", "result",
            "--guides", "recheck,generator,prm,oracle"]
    train.main(argv)
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    stages = [r["stage"] for r in rows]
    assert stages[:3] == ["generator", "labels", "scorers"]
    methods = {(r["method"], r["scorer"]) for r in rows if r["kind"] == "method"}
    assert ("beam search", "PRM") in methods and ("MCTS most-visited", "oracle") in methods
    for r in rows:  # each problem's tokens: the overall is their mean
        if r["kind"] == "method":
            assert all(abs(sum(t) / 3 - m) < 0.1 for t, m in zip(r["tokens_by_problem"],
                                                                 r["tokens"])), r["method"]
    assert ("beam search", "generator") in methods and ("best-of-N", "generator") in methods
    for r in rows:  # each problem's rightness at every budget, whose mean is the accuracy
        if r["kind"] == "method":
            for right, acc in zip(r["right_by_budget"], r["accuracy"]):
                assert len(right) == 3 and all(0 <= x <= 1 for x in right)
                assert abs(sum(right) / 3 - acc) < 1e-9, r["method"]
            # the total is every network's tokens; a learned scorer's count in it
            parts = zip(r["sampled_tokens"], r["prompt_tokens"], r["scorer_tokens"])
            assert all(abs(t - sum(p)) < 1e-2 for t, p in zip(r["tokens"], parts))
            if r["scorer"] in ("PRM", "generator", search.PRODUCT):  # read every item
                assert all(s > 0 for s in r["scorer_tokens"]), (r["method"], r["scorer"])
            if r["scorer"] in ("-", "oracle", "length", "random"):  # programs read nothing
                assert r["scorer_tokens"] == [0] * len(r["budget"]), (r["method"], r["scorer"])
    assert ("best-of-N", "learned recheck x generator") in methods
    assert ("weighted vote", "PRM") in methods
    assert search.headline_differences(rows)  # the equal-compute pairs exist
    assert len(tools) > 10 and all(tools)  # every sampling call had the calculator
    assert os.path.exists(os.path.join(out, "search.png"))
    train.main(argv)  # finished: nothing is redone, no row added
    assert read_jsonl(os.path.join(out, "metrics.jsonl")) == rows


def test_a_learned_scorer_search_never_calls_the_ground_truth_checker():
    class NoPeek(PathTask):
        def check(self, p, text):
            raise AssertionError("the checker was called during search")
        check_steps = check
    task = NoPeek()
    score = lambda items, cost: [len(t) / 100 for _, t, _ in items]  # noqa: E731 (a stand-in)
    search.beam_search(ToyLM(), task, [P0], score, 8, 4, 1.0, [0], common.TokenCount())
    search.mcts(ToyLM(), task, [P0], score, [6], 3, 1.0, 1.0, [0], common.TokenCount())


def test_product_scorer_multiplies_each_items_values_and_calls_each_scorer_once():
    calls = []

    def scorer(values):
        def score(items, cost):
            calls.append(len(items))
            return values
        return score
    both = search.product_scorer(scorer([0.5, 1.0, 0.0]), scorer([0.25, 0.75, 0.9]))
    assert both([(P0, "a", False)] * 3, common.TokenCount()) == [0.125, 0.75, 0.0]
    assert calls == [3, 3]


def test_math_shepherd_labels_on_the_toy_model():
    # ToyLM picks each step uniformly from a/b/c, so a rollout from a prefix is right with a
    # known probability: after "b\n" it must then pick c and a (1/9), after "b\nc\n" a (1/3),
    # after "b\nc\na\n" always; after a wrong first step never. A label is the share of R
    # rollouts that are right: checked within 5 standard errors (false failure < 1e-5)
    R = 300
    args = argparse.Namespace(rollouts=R, sample_batch_size=6 * R, temperature=1.0)
    texts = [[RIGHT, "a\nb\nc\nA: 1"]]
    rows, cost = search.shepherd_labels(ToyLM(), TASK, [P0], texts, args, seed=0)
    assert len(rows) == 2 and cost.sampled > 0
    (prompt, comp, reads, labels, exact), (_, comp2, reads2, labels2, exact2) = rows
    assert prompt == encode(TASK.prompt(P0)) and comp == encode(RIGHT) + [EOT]
    assert reads == vstar.step_reads(comp) and len(labels) == len(reads) == 4
    for got, p in zip(labels, [1 / 9, 1 / 3, 1.0, 1.0]):
        assert abs(got - p) <= 5 * math.sqrt(p * (1 - p) / R) + 1e-12, (labels, p)
    assert labels2 == [0.0, 0.0, 0.0, 0.0]  # wrong from its first step; its outcome wrong too
    # the program's labels: every step so far on the path; hard ones: any rollout right
    assert exact == [1.0] * 4 and exact2 == [0.0] * 4
    hard = [r[3] for r in search.prm_rows(rows, "hard")]
    assert hard == [[1.0] * 4, [0.0] * 4]  # (1/9 of 300 rollouts: P(none right) < 1e-15)
    assert [r[3] for r in search.prm_rows(rows, "exact")] == [exact, exact2]
    assert [r[3] for r in search.prm_rows(rows, "soft")] == [labels, labels2]


def test_prefix_pair_accuracy_pairs_good_and_bad_prefixes_of_the_same_depth():
    # prefixes at depth 1: b (good), a (bad); at depth 2: b c (good), a b and b a (bad); depth
    # 3: b c a (good), a b c and b a c (bad). The exact check ranks every pair right, a
    # constant ties them all, the reversed check ranks every pair wrong.
    texts = [[RIGHT, "a\nb\nc\nA: 1", "b\na\nc\nA: 1"]]
    exact = search.oracle_scorer(TASK)
    scorers = {"exact": exact, "none": lambda items, cost: [0.5] * len(items),
               "reversed": lambda items, cost: [1 - v for v in exact(items, cost)]}
    got = search.prefix_pair_accuracy(TASK, [P0], texts, scorers, list(scorers))
    assert got == {"prefix_pair_acc exact": 1.0, "prefix_pair_acc none": 0.5,
                   "prefix_pair_acc reversed": 0.0}

def test_the_process_reward_model_reads_the_end_of_every_step():
    comp = encode("b\nc\nA: 1") + [EOT]
    assert vstar.step_reads(comp) == [1, 3, 8]  # the two newlines and the end-of-text
    assert [comp[j] for j in vstar.step_reads(comp)] == [NEWLINE, NEWLINE, EOT]
    assert vstar.step_reads(encode("b\nc\n")) == [1, 3]  # a prefix: its steps so far
    assert vstar.orm_reads(comp) == [8]  # the outcome model reads the end-of-text only
