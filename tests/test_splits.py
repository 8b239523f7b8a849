"""
Held out means held out: no test problem, up to the task's symmetries (task.key), in any
training set, and no test problem twice. Checked on every method's default data, in two seeds.

Test: python -m pytest tests/test_splits.py
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import quiet_star  # noqa: E402
import train  # noqa: E402
from tasks import Problem, distinct_problems, get_task, held_out, sample_problems  # noqa: E402


def default_args(method, seed, *argv):
    parser = train.get_parser()
    args = parser.parse_args(["--method", method, "--seed", str(seed), *argv])
    return train.resolve(args, parser), args


def test_keys_name_the_same_problem_whatever_the_order():
    countdown, addition = get_task("countdown"), get_task("addition")
    a = Problem("3 11 7 T: 32", "32", 3, ((3, 11, 7), 32))
    b = Problem("7 3 11 T: 32", "32", 3, ((7, 3, 11), 32))
    assert countdown.key(a) == countdown.key(b) != countdown.key(
        Problem("3 11 7 T: 40", "40", 3, ((3, 11, 7), 40)))
    p = sample_problems(addition, 1, [2], seed=0)[0]
    x, y = p.data
    q = type(p)(question=f"{y}+{x}", answer=p.answer, difficulty=2, data=(y, x))
    assert addition.key(p) == addition.key(q)
    assert get_task("chain").key(p) == p.question  # no symmetry: the question itself


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", ["sft", "star", "vstar", "search", "sos"])
def test_no_test_problem_is_twice_in_the_test_set_or_in_any_training_set(method, seed):
    task, args = default_args(method, seed)
    P, D, test, _ = train.build_data(task, args)
    keys = [task.key(p) for p in test]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {task.key(p) for p in P + D}
    assert len(test) >= 0.9 * args.n_test  # only the smallest difficulties are cut short


@pytest.mark.parametrize("method", ["sft", "star", "vstar", "search", "sos", "quiet_star"])
def test_a_test_file_is_the_test_set_and_no_training_set_holds_its_problems(method, tmp_path,
                                                                           monkeypatch):
    # The file: problems that training would draw without it, written in both public formats
    # and another order, once twice: without the exclusion P and D would hold them all.
    task, args = default_args(method, 0, "--task", "countdown")
    drawn = train.build_data(task, args)[0] or quiet_star.train_problems(task, args, 0, frozenset())
    lines, keys = [], []
    for i, p in enumerate(drawn[:40] + drawn[:1]):
        numbers, target = p.data
        lines.append(f'{{"nums": {list(numbers)}, "target": {target}}}' if i % 2 else
                     f'{{"input": "{",".join(map(str, numbers[::-1]))}", "output": "{target}"}}')
        keys.append(task.key(p))
    f = tmp_path / "test.jsonl"
    f.write_text("\n".join(lines) + "\n")
    task, args = default_args(method, 0, "--task", "countdown", "--test-file", str(f))
    P, D, test, source = train.build_data(task, args)
    assert [task.key(p) for p in test] == list(dict.fromkeys(keys))  # in order, each once
    assert args.n_test == len(test) and "41 read" in source and "1 as repeats" in source
    if P is not None:
        assert not set(keys) & {task.key(p) for p in P + D}
        return
    # quiet_star draws its own training lines: the keys its run hands that draw are the file's
    handed = []

    def first_draw(task, args, step, test_keys):
        handed.append(test_keys)
        raise KeyboardInterrupt  # (no need to train)
    monkeypatch.setattr(quiet_star, "train_problems", first_draw)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--method", method, "--task", "countdown", "--test-file", str(f), "--out",
                    str(tmp_path / "run")])
    assert handed == [held_out(task, test)] and set(keys) <= handed[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_quiet_star_trains_on_no_test_line(seed):
    task, args = default_args("quiet_star", seed)
    P, D, test, _ = train.build_data(task, args)  # its held-out lines' problems
    assert P is None and D is None  # it draws its own training text
    keys = [task.key(p) for p in test]
    assert len(set(keys)) == len(keys) == args.n_test
    for step in range(-3, 5):  # base-model batches have negative steps
        assert not set(keys) & held_out(task, quiet_star.train_problems(task, args, step,
                                                                        frozenset(keys)))


def test_a_small_difficulty_gives_the_test_set_at_most_half_its_problems():
    # 1-digit addition has 55 unordered pairs: 27 may be tested, 28 stay for training
    task = get_task("addition")
    assert distinct_problems(task, 1) == 55
    test = sample_problems(task, 300, [1, 2], seed=0, distinct=True)
    ones = [p for p in test if p.difficulty == 1]
    assert len(ones) == 27 and sum(p.difficulty == 2 for p in test) == 150
    assert len(held_out(task, ones)) == 27
    train_set = sample_problems(task, 200, [1], seed=1, exclude=held_out(task, test))
    assert not held_out(task, train_set) & held_out(task, test)
    assert len(held_out(task, train_set)) == 28  # every pair left is drawn
