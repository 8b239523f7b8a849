"""
Guards search.py: on a toy model and task whose right path is known, beam search and MCTS find
it; UCT tries every unvisited child first and puts the PARENT's count in its log; backup touches
the path and nothing else; beam pruning keeps exactly the best distinct prefixes; every method's
token count is exact; the vote's tie rule and its treatment of unparsable answers; the shared-
prefix sampler equals the naive one, and a seeded row depends on no other row (what torchrun
needs); the run end to end, resumed without redoing a stage.

Run: python -m pytest tests/test_search.py
"""

import argparse
import math
import os
import random

import pytest
import torch
import torch.nn as nn

import search
import train
import vstar
from model import GPT, GPTConfig, generate_naive, read_jsonl
from tasks import EOT, NEWLINE, PAD, Problem, Task, decode, encode, get_task
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
                                    temperature=1.0, seeds=[seed], cost=search.Cost())
        assert chosen == [RIGHT]


def test_mcts_finds_the_known_path():
    # A node is expanded once, so a seed fails when the 20 samples of a node on the path all
    # miss its right letter: 3 * (2/3)^20 = 1e-3 (measured: 1 failure in 200 seeds; with 6
    # samples per expansion, 46 in 200, as 3 * (2/3)^6 predicts)
    for seed in range(3):
        res = search.mcts(ToyLM(), TASK, [P0], search.oracle_scorer(TASK), [40], k=20, c=1.0,
                          temperature=1.0, seeds=[seed], cost=search.Cost())
        most_visited, voted, _, _ = res[40]
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
    score = lambda items: [sum(map(ord, t)) / 1000 for _, t, _ in items]  # noqa: E731
    search.beam_search(ToyLM(), TASK, [P0, P0], score, N=8, M=4, temperature=1.0,
                       seeds=[0, 1], cost=search.Cost())
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
    cost = search.Cost()
    search.rollouts(model, TASK, [(P0, "")], [7], 1.0, list(range(7)), cost)
    assert (cost.sampled, cost.prompt) == (7 * whole, prompt)
    # beam search: N steps sampled every round, every solution ends together
    for N, M in ((8, 4), (6, 2)):
        cost = search.Cost()
        search.beam_search(model, TASK, [P0, P0], search.oracle_scorer(TASK), N, M, 1.0, [0, 1],
                           cost)
        assert cost.sampled == 2 * N * whole
    # MCTS is anytime: its count after fewer simulations is a prefix of the same search's
    k, cost = 3, search.Cost()
    res = search.mcts(model, TASK, [P0], search.oracle_scorer(TASK), [1, 5, 9], k, 1.0, 1.0,
                      [0], cost)
    assert res[9][2] == cost.sampled and 0 < res[1][2] < res[5][2] <= res[9][2]


def test_mcts_token_count_matches_its_tree(monkeypatch):
    made = []
    init = search.Node.__init__

    def record(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(search.Node, "__init__", record)
    k, cost = 3, search.Cost()
    search.mcts(ToyLM(), TASK, [P0], search.oracle_scorer(TASK), [12], k, 1.0, 1.0, [1], cost)
    expected = 0
    for n in made:
        if n.children:  # expanded once: k samples of a line, then one rollout of child 0
            d = n.text.count("\n")
            expected += k * (2 if d < 3 else 5)
            if not n.children[0].finished:
                expected += 2 * (3 - (d + 1)) + 5
    assert cost.sampled == expected


def test_majority_vote_tie_rule_and_unparsable_answers():
    assert search.vote(["x", "y", "y", "x"]) == "x"  # a tie goes to the answer seen first
    assert search.vote(["y", "x", "x", "y"]) == "y"
    assert search.vote(["x", "y"], [0.5, 0.5]) == "x"
    assert search.vote(["x", "y", "y"], [0.9, 0.3, 0.3]) == "x"  # weights, not counts
    assert search.vote([None, None, None, "x"]) == "x"  # unparsable answers cast no vote
    assert search.vote([None, "x"], [10.0, 0.1]) == "x"
    assert search.vote([None, None]) is None
    # a pool where every subset has only unparsable answers or one wrong one: never right
    assert search.weighted_vote_accuracy([None, None, "w"], [True, True, False], 2,
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
    cost = search.Cost()
    rows = search.continue_prefixes(model, prefixes, copies, 12, (), 1.0, seeds, cost)
    assert [len(r) for r in rows] == [12, 12, 12, 6, 12, 12]  # no stop token: each its own room
    assert cost.sampled == 66 and cost.prompt == 5 + 58 + 2
    tokens, _, lengths = generate_naive(model, [prefixes[0], prefixes[2]], 12, (), PAD, 1.0,
                                        banned_tokens=search.BANNED, seeds=[4, 8, 15, 6, 2],
                                        copies=[3, 2])
    assert rows[:3] + rows[4:] == tokens.tolist()
    for u, at in ((0, 0), (1, 3), (2, 4)):  # each prefix alone: the same rows
        alone = search.continue_prefixes(model, [prefixes[u]], [copies[u]], 12, (), 1.0,
                                       seeds[at:at + copies[u]], search.Cost())
        assert alone == rows[at:at + copies[u]]


@pytest.mark.slow
def test_search_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    # an untrained generator writes garbage to the end of every budget: keep the budgets short
    monkeypatch.setattr(search, "ROLLOUT_TOKENS", 32)
    monkeypatch.setattr(search, "STEP_TOKENS", 12)
    out = str(tmp_path / "run")
    argv = ["--method", "search", "--out", out, "--n-train", "6", "--n-unlabeled", "2",
            "--n-test", "3", "--steps", "2", "--verifier-steps", "2", "--eval-samples", "2",
            "--budgets", "1,2", "--samples", "2", "--rollouts", "2", "--batch-size", "4",
            "--train-difficulty", "2", "--test-difficulty", "2"]
    train.main(argv)
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    stages = [r["stage"] for r in rows]
    assert stages[:3] == ["generator", "labels", "scorers"]
    methods = {(r["method"], r["scorer"]) for r in rows if r["kind"] == "method"}
    assert ("beam search", "PRM") in methods and ("MCTS most-visited", "oracle") in methods
    assert ("beam search", "generator") in methods and ("best-of-N", "generator") in methods
    for r in rows:  # each problem's rightness at the largest budget, whose mean is the accuracy
        if r["kind"] == "method":
            assert len(r["last"]) == 3 and all(0 <= x <= 1 for x in r["last"])
            assert abs(sum(r["last"]) / 3 - r["accuracy"][-1]) < 1e-9, r["method"]
    assert os.path.exists(os.path.join(out, "search.png"))
    train.main(argv)  # finished: nothing is redone, no row added
    assert read_jsonl(os.path.join(out, "metrics.jsonl")) == rows


def test_a_learned_scorer_search_never_calls_the_ground_truth_checker():
    class NoPeek(PathTask):
        def check(self, p, text):
            raise AssertionError("the checker was called during search")
        check_steps = check
    task = NoPeek()
    score = lambda items: [len(t) / 100 for _, t, _ in items]  # noqa: E731 (a stand-in scorer)
    search.beam_search(ToyLM(), task, [P0], score, 8, 4, 1.0, [0], search.Cost())
    search.mcts(ToyLM(), task, [P0], score, [6], 3, 1.0, 1.0, [0], search.Cost())


def test_product_scorer_multiplies_each_items_values_and_calls_each_scorer_once():
    calls = []

    def scorer(values):
        def score(items):
            calls.append(len(items))
            return values
        return score
    both = search.product_scorer(scorer([0.5, 1.0, 0.0]), scorer([0.25, 0.75, 0.9]))
    assert both([(P0, "a", False)] * 3) == [0.125, 0.75, 0.0] and calls == [3, 3]


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
    (prompt, comp, reads, labels), (_, comp2, reads2, labels2) = rows
    assert prompt == encode(TASK.prompt(P0)) and comp == encode(RIGHT) + [EOT]
    assert reads == vstar.step_reads(comp) and len(labels) == len(reads) == 4
    for got, p in zip(labels, [1 / 9, 1 / 3, 1.0, 1.0]):
        assert abs(got - p) <= 5 * math.sqrt(p * (1 - p) / R) + 1e-12, (labels, p)
    assert labels2 == [0.0, 0.0, 0.0, 0.0]  # wrong from its first step; its outcome wrong too


def test_the_process_reward_model_reads_the_end_of_every_step():
    comp = encode("b\nc\nA: 1") + [EOT]
    assert vstar.step_reads(comp) == [1, 3, 8]  # the two newlines and the end-of-text
    assert [comp[j] for j in vstar.step_reads(comp)] == [NEWLINE, NEWLINE, EOT]
    assert vstar.step_reads(encode("b\nc\n")) == [1, 3]  # a prefix: its steps so far
    assert vstar.orm_reads(comp) == [8]  # the outcome model reads the end-of-text only


def test_exact_step_labels_mark_the_first_wrong_step_and_everything_after():
    # the diagnostic verifier's labels: a prefix is right iff every step in it is (countdown:
    # valid arithmetic and the target still reachable), then the outcome at the end-of-text
    task = get_task("countdown")
    p = Problem(question="3 4 5 T: 27", answer="27", difficulty=3, data=((3, 4, 5), 27))
    texts = ["5+4=9\n9*3=27\nA: 27",    # right
             "5+4=9\n9*3=28\nA: 27",    # an arithmetic slip in step 2
             "5*4=20\n20+3=23\nA: 27"]  # step 1 is valid but 27 is then out of reach
    labelled = [(encode(task.prompt(p)), encode(t) + [EOT], task.check(p, t)) for t in texts]
    rows = vstar.exact_step_rows(task, [p], labelled)
    assert [labels for _, _, _, labels in rows] == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert all(reads == vstar.step_reads(c) for _, c, reads, _ in rows)
