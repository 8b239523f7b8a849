"""
Tests of Stream of Search's countdown traces (tasks/countdown.py): the trace a symbolic search
writes, by hand and over sampled problems, and the exact checkers of such traces.

Run: python -m pytest tests/test_sos.py
"""

import argparse
import random
import statistics
from functools import lru_cache

import pytest
import torch

from tasks import Problem, encode, get_task, reachable, sample_problems
from tasks.countdown import (DEFAULT_BUDGET, FAILED, STRATEGIES, moves, search_trace,
                             trace_backtracks, trace_lines_ok, trace_outcome_ok, trace_solution)

TASK = get_task("countdown")
# 3 numbers: at most 3 pairs x 4 operations = 12 children, each with 2 numbers and so at most 4
# leaves: 12 + 48 lines explore the whole tree.
FULL_3 = 60


def problem(numbers, target):
    return Problem(" ".join(map(str, numbers)) + f" T: {target}", str(target), len(numbers),
                   (tuple(numbers), target))


@lru_cache(maxsize=None)
def tree_lines(state):
    """How many lines a search that explores the whole tree below `state` writes."""
    return sum(1 + (tree_lines(after) if len(after) > 1 else 0) for _, after in moves(state))


def explored(text):
    """The explored lines of a trace (everything before its solution or failure line)."""
    solution = trace_solution(text)
    lines = text.split("\n")
    return lines[:len(lines) - (solution.count("\n") + 1 if solution else 0)]


# ---------------------------------------------------------------- by hand

# (3 7 11) -> 32 by closeness to 32 of the closest number left: 11*3 leaves 33 (1 away), the
# best first move, but no leaf below it is 32 (26, 40, 231 in order of closeness); the search
# backs out to 7*3 (21 is 11 away), where 21+11 is the goal.
HAND = """\
11*3=33 (7 33)
 33-7=26 x
 33+7=40 x
 33*7=231 x
7*3=21 (11 21)
 21+11=32 !
7*3=21
21+11=32
A: 32"""


def test_countdown_dfs_near_trace_by_hand():
    p = problem((11, 3, 7), 32)
    text, found = search_trace((11, 3, 7), 32, "dfs-near")
    assert found and text == HAND
    assert search_trace((3, 7, 11), 32, "dfs-near") == (HAND, True)  # the order is not read
    assert trace_solution(text) == "7*3=21\n21+11=32\nA: 32" and TASK.check(p, trace_solution(text))
    assert trace_outcome_ok(p, text) and trace_lines_ok(p, text) == [True] * 6
    assert trace_backtracks(text)
    # the sum of what is left: 7*3 leaves 11+21 = 32 already, so no dead end before the goal
    text, found = search_trace((11, 3, 7), 32, "dfs-sum")
    assert found and text == "7*3=21 (11 21)\n 21+11=32 !\n7*3=21\n21+11=32\nA: 32"
    assert not trace_backtracks(text)


def test_countdown_bfs_trace_by_hand():
    # The whole first level by closeness to 32 (ties in moves() order), then the two best
    # states expanded in turn, each written again before its children.
    text, found = search_trace((11, 3, 7), 32, "bfs-2")
    assert found and text == """\
11*3=33 (7 33)
7*3=21 (11 21)
11+7=18 (3 18)
11+3=14 (7 14)
7+3=10 (10 11)
7-3=4 (4 11)
11-3=8 (7 8)
11-7=4 (3 4)
11*7=77 (3 77)
""" + HAND  # then the dfs-near trace's lines: 11*3 and 7*3 are the two best states
    assert all(trace_lines_ok(problem((11, 3, 7), 32), text))


def test_countdown_failed_search_by_hand():
    # 999 is out of reach of 2, 3, 4 (the largest value is 4*3*2 = 24). Closest to 999 first:
    # 4*3 leaves 12, its leaves 24, 14, 10, 6; then 4*2 leaves 8, and the budget of 7 lines ends
    # the search at its first leaf.
    p = problem((2, 3, 4), 999)
    text, found = search_trace((2, 3, 4), 999, "dfs-near", budget=7)
    assert not found and text == """\
4*3=12 (2 12)
 12*2=24 x
 12+2=14 x
 12-2=10 x
 12/2=6 x
4*2=8 (3 8)
 8*3=24 x
A: none"""
    assert trace_lines_ok(p, text) == [True] * 7
    assert not trace_outcome_ok(p, text) and not trace_backtracks(text)
    assert trace_solution(text) == FAILED and not TASK.check(p, FAILED)
    # exhausted without a budget to stop it: every line of the tree, then the failure line
    text, found = search_trace((2, 3), 7, "dfs-near", budget=100)
    assert (text, found) == ("3*2=6 x\n3+2=5 x\n3-2=1 x\nA: none", False)
    assert search_trace((2, 3), 7, "dfs-near", budget=0) == ("A: none", False)


def test_countdown_unknown_strategy():
    for strategy in ("dfs", "dfs-far", "bfs-0", "bfs-x", "astar"):
        with pytest.raises(ValueError, match="unknown strategy"):
            search_trace((2, 3), 5, strategy)


# ---------------------------------------------------------------- against the solver

def with_unreachable(problems):
    """The problems, and each with a target next to its own (often out of reach)."""
    out = []
    for p in problems:
        numbers, target = p.data
        out += [p, problem(numbers, target + 1)]
    return out


@pytest.mark.parametrize("strategy", ["dfs-near", "dfs-sum"])
def test_countdown_dfs_reaches_the_solvers_verdict(strategy):
    # With budget for the whole tree (2 to 4 numbers), depth-first search finds the target
    # exactly when the solver says it is reachable; a failed search wrote every line of the
    # tree. Every trace is all valid lines; a found one ends with a solution Countdown accepts.
    ps = with_unreachable(sample_problems("countdown", 150, [2, 3, 4], seed=1))
    assert 0 < sum(not reachable(*p.data) for p in ps) < len(ps)
    for p in ps:
        numbers, target = p.data
        full = tree_lines(tuple(sorted(numbers)))
        assert len(numbers) != 3 or full <= FULL_3
        text, found = search_trace(numbers, target, strategy, budget=full)
        assert found == reachable(numbers, target), (p, text)
        assert found == trace_outcome_ok(p, text)
        assert all(trace_lines_ok(p, text)), (p, text)
        if not found:
            assert text.count("\n") == full and text.endswith("\n" + FAILED)


def test_countdown_bfs_finds_only_reachable_targets():
    # A beam of 2 may miss a reachable target (tasks/countdown.py, choice 2), never finds an
    # unreachable one; a beam wider than any level is breadth-first search and finds exactly
    # what the solver does.
    ps = with_unreachable(sample_problems("countdown", 150, [2, 3, 4], seed=2))
    missed = 0
    for p in ps:
        numbers, target = p.data
        text, found = search_trace(numbers, target, "bfs-2", budget=10_000)
        assert found <= reachable(numbers, target) and found == trace_outcome_ok(p, text)
        assert all(trace_lines_ok(p, text)), (p, text)
        missed += reachable(numbers, target) and not found
        if len(numbers) <= 3:
            text, found = search_trace(numbers, target, "bfs-100", budget=10_000)
            assert found == reachable(numbers, target) and all(trace_lines_ok(p, text))
    assert missed > 0  # the beam is not complete: it does miss some


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_countdown_traces_within_a_small_budget_are_valid(strategy):
    ps = sample_problems("countdown", 150, [2, 3, 4], seed=3)
    failed = 0
    for budget in (1, 5, DEFAULT_BUDGET):
        for p in ps:
            text, found = search_trace(*p.data, strategy, budget=budget)
            assert len(explored(text)) <= budget
            assert all(trace_lines_ok(p, text)) and found == trace_outcome_ok(p, text)
            failed += not found
            if not found:
                assert text.endswith(FAILED) and trace_solution(text) == FAILED
    assert failed > 0


# ---------------------------------------------------------------- checkers by hand

def test_countdown_trace_lines_ok_flags_exactly_the_wrong_line():
    p = problem((11, 3, 7), 32)
    lines = HAND.split("\n")

    def labels(k, line):
        return trace_lines_ok(p, "\n".join(lines[:k] + [line] + lines[k + 1:]))

    def only(k):
        return [j != k for j in range(6)]

    assert labels(1, " 33-7=25 x") == only(1)           # wrong arithmetic
    # A wrong line's children are judged against what it claims (tasks/countdown.py, choice
    # 1): here each of them uses 33, which the claim lacks.
    assert labels(0, "11*3=34 (7 34)") == [False] * 4 + [True] * 2
    assert labels(2, " 33+11=44 x") == only(2)          # 11 is not left after 11*3
    assert labels(5, " 21+21=42 x") == only(5)          # only one 21 to take
    assert labels(0, "11*3=33 (33 7)") == only(0)       # a state not sorted
    assert labels(0, "11*3=33 (7 33 3)") == [False] * 4 + [True] * 2  # a number too many:
    # and so below it no leaves, but states of two numbers
    assert labels(3, " 33*7=231 !") == only(3)          # wrong mark: not the target
    assert labels(5, " 21+11=32 x") == only(5)          # wrong mark: the target
    assert labels(5, " 21+11=32 (32)") == only(5)       # a leaf written as a state
    assert labels(4, "7*3=21 x") == [True] * 4 + [False, False]  # a state as a leaf: and no
    # child hangs below a leaf
    assert labels(5, "  21+11=32 !") == only(5)         # two levels below its previous line
    assert labels(5, "21+11=32 !") == only(5)           # the root has no 21
    assert labels(1, "33-7=26 x") == [True, False, False, False, True, True]  # at depth 0:
    # no 33 in the question; and the lines after it hang below a leaf
    assert labels(1, " 33 - 7 = 26 x") == only(1)       # does not parse
    assert labels(1, " 33-07=26 x") == only(1)          # not a canonical number
    # a wrong state on a line without children: that line alone
    text = search_trace((11, 3, 7), 32, "bfs-2")[0].replace("(3 18)", "(3 19)")
    assert trace_lines_ok(p, text) == [k != 2 for k in range(15)]


def test_countdown_trace_lines_ok_flags_a_flipped_mark_exactly():
    rng = random.Random(7)
    tested = 0
    for p in sample_problems("countdown", 100, [3, 4], seed=4):
        text, _ = search_trace(*p.data, rng.choice(STRATEGIES))
        lines = explored(text)
        leaves = [k for k, line in enumerate(lines) if line[-2:] in (" x", " !")]
        if not leaves:
            continue
        k = rng.choice(leaves)
        lines[k] = lines[k][:-1] + ("x" if lines[k].endswith("!") else "!")
        assert trace_lines_ok(p, "\n".join(lines)) == [j != k for j in range(len(lines))]
        tested += 1
    assert tested > 50


def test_countdown_trace_outcome_ok_rechecks_the_path_from_the_question():
    p = problem((11, 3, 7), 32)
    trace = HAND.rsplit("\n", 3)[0]  # the explored lines alone
    assert trace + "\n7*3=21\n21+11=32\nA: 32" == HAND
    assert not trace_outcome_ok(p, trace + "\n11*3=33\n33-7=26\nA: 32")  # a dead end's path
    assert not trace_outcome_ok(p, trace + "\n7*3=21\n21+11=33\nA: 32")  # wrong arithmetic
    assert not trace_outcome_ok(p, trace + "\n7*3=21\n21+11=32\nA: 33")  # wrong answer
    assert not trace_outcome_ok(p, trace + "\n7*3=21\nA: 32")            # 11 left over
    assert not trace_outcome_ok(p, trace + "\n21+11=32\nA: 32")          # no 21 to start with
    assert not trace_outcome_ok(p, trace + "\n7*3=21\n21+11=32")         # no answer line
    assert not trace_outcome_ok(p, trace + "\n" + FAILED)
    assert trace_outcome_ok(p, "7*3=21\n21+11=32\nA: 32")  # the path alone: the outcome only


def test_countdown_checkers_are_total():
    p = problem((11, 3, 7), 32)
    rng = random.Random(8)
    big = "9" * 30
    texts = ["", "\n", "\n\n", " ", "A: 32", "A:", "A: none", "x", "!", "()", " (1 2)",
             "1+1=2", "1+1=2 x\nA: 2", "\t11*3=33 (7 33)", " " * 500 + "1+1=2 x",
             f"{big}*{big}={int(big) ** 2} x", f"{big}*{big}={big} ({big} {big})",
             "9" * 40 + "+1=1 x", HAND + "\n", HAND + "\n\n", HAND.replace("\n", "\r\n"),
             HAND + "\nA: 32", "\n".join(HAND.split("\n")[::-1])]
    alphabet = "0123456789+-*/=() x!A:\n "
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
              for _ in range(300)]
    texts += ["".join(chr(rng.randint(32, 126)) for _ in range(60)) for _ in range(100)]
    lines = HAND.split("\n")
    texts += ["\n".join(rng.choices(lines, k=rng.randint(1, 9))) for _ in range(200)]
    for text in texts:
        labels = trace_lines_ok(p, text)
        assert isinstance(labels, list) and all(isinstance(ok, bool) for ok in labels)
        assert isinstance(trace_outcome_ok(p, text), bool)
        assert isinstance(trace_backtracks(text), bool)
        solution = trace_solution(text)
        assert solution is None or isinstance(solution, str)
    assert trace_lines_ok(p, "") == [False] and trace_lines_ok(p, "A: 32") == []
    assert not trace_outcome_ok(p, "A: 32") and trace_solution("A: 32") == "A: 32"
    assert trace_solution("") is None and trace_solution(HAND.rsplit("\n", 1)[0]) is None
    assert trace_lines_ok(p, " 33-7=26 x") == [False]  # a child without a parent line
    assert not trace_backtracks("") and not trace_backtracks("1+1=2 x\nA: none")


# ---------------------------------------------------------------- length

# Tokens (len(encode(text))) of the trace at DEFAULT_BUDGET = 24 lines, over 200 3-number
# problems (sample_problems seed 0), as measured: dfs-near mean 109.5, max 357; dfs-sum mean
# 104.4, max 359; bfs-2 mean 221.7, max 318; dfs-random (seed 0) mean 177.2, max 360. The
# bounds below leave a margin.
LENGTH_BOUNDS = {"dfs-near": (130, 400), "dfs-sum": (130, 400), "bfs-2": (250, 400),
                 "dfs-random": (210, 400)}


def test_random_dfs_is_seeded_and_complete():
    # the same seed the same trace, other seeds other move orders; with no line budget it finds
    # every reachable target (it is exhaustive); its heuristic orders are no better than chance
    ps = sample_problems("countdown", 60, [3, 4], seed=4)
    for p in ps:
        assert search_trace(*p.data, "dfs-random", seed=3) == search_trace(*p.data, "dfs-random",
                                                                           seed=3)
        assert search_trace(*p.data, "dfs-random", budget=10 ** 6)[1] == reachable(*p.data)
    firsts = {search_trace(*ps[0].data, "dfs-random", seed=s)[0].split("\n")[0] for s in range(20)}
    assert len(firsts) > 5  # the first move tried varies with the seed


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_countdown_trace_length_is_bounded(strategy):
    ps = sample_problems("countdown", 200, [3], seed=0)
    lengths = [len(encode(search_trace(*p.data, strategy)[0])) for p in ps]
    mean_bound, max_bound = LENGTH_BOUNDS[strategy]
    assert statistics.mean(lengths) <= mean_bound and max(lengths) <= max_bound


# ---------------------------------------------------------------- the calculator and --method sos

def test_countdown_calculator_writes_results_and_as_judge_the_rest_of_a_trace_line():
    from tasks.countdown import Calculator
    p = problem((11, 3, 7), 32)
    result, judge = Calculator("result"), Calculator("judge")
    cases = [  # (text so far, what "result" writes, what "judge" writes)
        ("11*3=", "33", "33 (7 33)"),
        ("11*3=33 (7 33)\n 33-7=", "26", "26 x"),
        ("11*3=33 (7 33)\n 33-7=26 x\n 33+7=", "40", "40 x"),
        ("11*3=33 (7 33)\n 33-7=26 x\n33+7=", "40", "40 x"),  # 33 is not left at depth 0
        ("11*3=33 (7 33)\n  33+7=", "40", "40 x"),  # no parent line at depth 1
        ("7*3=21 (11 21)\n 21+11=", "32", "32 !\n7*3=21\n21+11=32\nA: 32"),  # the goal
        ("11*3=33 (7 33)\n 33-7=26 x\n7*3=21 (11 21)\n 21+11=", "32",
         "32 !\n7*3=21\n21+11=32\nA: 32"),  # the path from the root, past the dead end
        ("5/2=", "", " x"), ("3-7=", "", " x"), ("=", "", " x"), ("A: 3=", "", " x"),
        ("", "", ""),
        ("11*3", "", ""),
    ]
    for text, r, j in cases:
        assert (result(p, text), judge(p, text)) == (r, j), text
    with pytest.raises(ValueError, match="bogus"):
        Calculator("bogus")
    from tasks.countdown import Countdown, CountdownTraces
    assert Countdown("result").tool(p, "7*3=") == "21\n"  # a path's line ends there
    assert CountdownTraces("result").tool(p, "7*3=") == "21"  # a trace's line goes on


def test_countdown_calculator_is_total_and_its_judge_writes_what_the_trace_writer_writes():
    from tasks.countdown import Calculator
    judge, rng = Calculator("judge"), random.Random(3)
    p = problem((11, 3, 7), 32)
    for _ in range(300):
        text = "".join(rng.choice("0123456789+-*/=() x!A:\n ") for _ in range(rng.randint(0, 60)))
        assert isinstance(judge(p, text + "="), str)
    # at every "=" of a symbolic trace's explored lines, the judge given the text before it
    # writes what follows: the rest of the line, or at the goal the rest of the trace
    for q in sample_problems("countdown", 30, [3], seed=4):
        for strategy in ("dfs-near", "dfs-sum"):
            trace, found = search_trace(*q.data, strategy)
            goal = trace.find(" !")
            for i, ch in enumerate(trace[:goal if found else None]):
                if ch == "=":
                    end = trace.find("\n", i)
                    want = trace[i + 1:] if found and end > goal else trace[i + 1:end]
                    assert judge(q, trace[:i + 1]) == want


def test_countdown_traces_task_checks_a_trace_by_the_path_it_ends_with():
    from tasks.countdown import CountdownTraces
    traces, p = CountdownTraces(), problem((11, 3, 7), 32)
    gold = traces.gold_completion(p)
    assert traces.check(p, gold) and traces.strategy(p) in traces.mix
    assert traces.check(p, HAND) and not traces.check(p, HAND.replace("A: 32", "A: 33"))
    assert not traces.check(p, HAND.rsplit("\n", 3)[0] + "\n" + FAILED)
    assert traces.extract_answer(HAND) == "7*3=21;21+11=32;A: 32"
    assert traces.tool is None and CountdownTraces("judge").tool.mode == "judge"


def test_the_sampler_counts_the_tokens_a_tool_wrote_its_own_trigger_included():
    # the tool writes its trigger (then "7"): the count is what the sampler forced; a replay
    # calling the tool at every trigger in the text would take the tool's for the model's
    import star
    from collections import Counter
    from model import GPT, get_config
    from tasks.countdown import Countdown
    task = Countdown()
    torch.manual_seed(0)
    model = GPT(get_config("tiny", n_layer=1, n_embd=32, n_head=2)).eval()
    ps = sample_problems("countdown", 6, [3], seed=5)
    free, _ = star.sample(model, task, ps, n=2, temperature=1.0, seed=1)
    task.tool = TriggerTool(Counter("".join(t for ts in free for t in ts)).most_common(1)[0][0])
    texts, cost = star.sample(model, task, ps, n=2, temperature=1.0, seed=1)
    written = sum(sum(star.tool_written(task, p, t)) for p, ts in zip(ps, texts) for t in ts)
    every_trigger = sum(2 for ts in texts for t in ts for ch in t if ch == task.tool.trigger)
    assert cost.written == written > 0 and every_trigger > written
    row, _ = star.held_out_results(model, task, ps, argparse.Namespace(sample_batch_size=4))
    greedy, greedy_cost = star.sample(model, task, ps)
    assert row["written_tokens"] == greedy_cost.written / len(ps)  # what sos reports


class TriggerTool:
    """Writes its own trigger, then "7"."""

    def __init__(self, trigger):
        self.trigger = trigger

    def __call__(self, p, text):
        return self.trigger + "7"


SOS_RUN = ["--method", "sos", "--n-train", "12", "--n-unlabeled", "6", "--n-test", "6",
           "--steps", "6", "--star-steps", "3", "--iterations", "1", "--eval-samples", "2",
           "--train-difficulty", "2", "--test-difficulty", "2", "--batch-size", "4"]


def test_sos_compares_at_equal_tokens_with_integer_k_and_the_programs():
    # a sample costs 20 tokens and the prompt 10 once: a trace of 75 tokens matches k = 3
    # (70 tokens), not the power of 2 below; a program is right where it answers within 75
    import sos
    pass1 = [0.0, 0.25, 0.5, 1.0]  # of N = 4 samples
    bon = {"k": [1, 2, 4], "best": [pass1] * 3, "pass": [pass1] * 3,
           "tokens": {"prompt": 10.0, "sampled": 20.0, "scored": 5.0}}
    k, right = sos.pass_within(bon, 75)
    assert k == 3 and right == [0.0, 0.75, 1.0, 1.0]  # 1 - C(4-c, 3) / C(4, 3)
    rows = [{"kind": "sos", "model": "paths", "right": [0, 0, 1, 1], "best_of_n": bon},
            {"kind": "sos", "model": "traces 0", "right": [1, 1, 1, 0], "prompt_tokens": 10,
             "completion_tokens": 65},
            {"kind": "symbolic", "search": "random DFS", "tokens": [60, 80, 90, 70],
             "found": [1, 1, 0, 1]}]
    # stopped at C = 80 the program spends (60 + 80 + 80 + 70) / 4 = 72.5 <= 75 (at 90: 75, and
    # 90 is a failure's length: it stops there, not found)
    assert sos.solved_within(rows[2], 75) == (90, [1, 1, 0, 1])
    assert sos.solved_within(rows[2], 72.5) == (80, [1, 1, 0, 1])
    assert sos.solved_within(rows[2], 70) == (70, [1, 0, 0, 1])  # 67.5
    got = {name: d for name, (d, _) in sos.headline_differences(rows).items()}
    assert got["traces 0 - paths pass@k (equal tokens)"] == (1 + 0.25 + 0 - 1) / 4
    assert got["traces 0 - random DFS (equal tokens)"] == (0 + 0 + 1 - 1) / 4
    assert got["traces 0 - paths best-of-k (equal tokens)"] == (1 + 0.75 + 0.5 - 1) / 4
    # best-of-2 costs 10 + 2 x 25 = 60 <= 75, best-of-4 110; below one sample's 35, k = 1
    assert sos.best_within(bon, 75) == 1 and sos.best_within(bon, 20) == 0


def test_sos_runs_end_to_end_and_resumes(tmp_path):
    import os

    import sos
    import train
    from common import read_jsonl
    out = str(tmp_path / "run")
    train.main(SOS_RUN + ["--out", out])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r.get("model", r.get("search")) for r in rows] == ["paths", "traces 0", "traces 1",
                                                             "teacher", "random DFS"]
    assert "traces 1 - random DFS (equal tokens)" in sos.headline_differences(rows)
    assert rows[0]["best_of_n"]["k"] == [1, 2] and len(rows[0]["right"]) == 6
    assert rows[1]["trained_tokens"] > rows[0]["trained_tokens"]  # traces are longer
    for name in ["summary.md", "sos.png", "traces_iter1.pt", "samples_traces1.txt"]:
        assert os.path.exists(os.path.join(out, name)), name
    train.main(SOS_RUN + ["--out", out])  # resumes: nothing left to do
    assert read_jsonl(os.path.join(out, "metrics.jsonl")) == rows


@pytest.mark.parametrize("argv,words", [
    (["--calculator", "abacus"], ["--calculator", "abacus", "judge"]),
    (["--beta", "0.1"], ["--beta", "sos", "--calculator"]),
])
def test_sos_flags_are_refused_as_the_other_methods_are(argv, words, tmp_path, capsys):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(["--method", "sos", "--out", str(tmp_path / "r")] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    for w in words:
        assert w in err, (w, err)
