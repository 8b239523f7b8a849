"""
Synthetic reasoning tasks whose answers and every step a program can check.

    from tasks import get_task, sample_problems
    task = get_task("addition")
    train = sample_problems(task, 1000, difficulties=[1, 2, 3], seed=0)
    task.prompt(train[0]) + task.gold_completion(train[0])   # "Q: 7+5\n7+5+0=12 2 C1\nA: 12"

Each family (base.Task) samples problems, writes gold rationales, and verifies completions by
outcome (check) and by step (check_steps). tokenizer.py is the character-level tokenizer the
model reads them with. Nothing here imports torch or the methods.

Test: python -m pytest tests/test_tasks.py

A new task is one new file (a Task subclass) and one line in TASKS below.
"""

import random
from functools import lru_cache

from .addition import Addition
from .chain import Chain
from .base import Problem, Task
from .countdown import Countdown, reachable, solve
from .expression import Expression
from .tokenizer import (EOT, EOTH, NEWLINE, NOT_TEXT, PAD, SOT, decode, encode,
                        get_tokenizer)
from .tokenizer import NAME as TOKENIZER  # saved in every checkpoint

TASKS = {
    "addition": Addition(),
    "chain": Chain(),
    "countdown": Countdown(),
    "expression": Expression(),
}


def get_task(name) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    return TASKS[name]


# A test set takes at most this share of a difficulty's distinct problems, so a training set
# always has the rest to draw from (1-digit addition has 55 unordered pairs: at most 27 tested).
TEST_SHARE = 0.5
COUNT_DRAWS = 20000  # draws that count a difficulty's distinct problems (distinct_problems)


@lru_cache(maxsize=None)
def distinct_problems(task, difficulty):
    """How many distinct problems (by task.key) the task samples at a difficulty: the distinct
    keys of COUNT_DRAWS draws from a fixed seed. Exact for the small spaces this is used for."""
    rng = random.Random(f"count {task.name} {difficulty}")
    return len({task.key(task.sample(rng, difficulty)) for _ in range(COUNT_DRAWS)})


def held_out(task, problems):
    """The keys of a test set: what every training set is drawn without (exclude=...)."""
    return frozenset(task.key(p) for p in problems)


def sample_problems(task, n, difficulties, seed, exclude=frozenset(), distinct=False):
    """n problems, problem i at difficulties[i % len(difficulties)], from random.Random(seed).

    A problem whose task.key is in `exclude` (the keys of the test set: held_out(task, test))
    is resampled, up to 1000 tries per problem. Duplicates are allowed unless distinct=True, as
    a test set is drawn: then no key appears twice, and a difficulty gets at most TEST_SHARE of
    its distinct problems; where that is fewer than asked, its remaining slots are skipped (the
    list is shorter than n; train.py says so).
    """
    task = get_task(task) if isinstance(task, str) else task
    difficulties = list(difficulties)
    if not difficulties:
        raise ValueError("difficulties is empty")
    for d in difficulties:
        task.validate(d)
    rng = random.Random(seed)
    problems, seen, per = [], set(exclude), {}
    for i in range(n):
        d = difficulties[i % len(difficulties)]
        if distinct and per.get(d, 0) >= int(TEST_SHARE * distinct_problems(task, d)):
            continue
        for _ in range(1000):
            p = task.sample(rng, d)
            if task.key(p) not in seen:
                break
        else:
            raise ValueError(f"could not sample a {task.name} problem of difficulty {d} "
                             "outside `exclude` in 1000 tries (too few distinct problems?)")
        if distinct:
            seen.add(task.key(p))
            per[d] = per.get(d, 0) + 1
        problems.append(p)
    return problems


__all__ = ["TASKS", "get_task", "sample_problems", "held_out", "distinct_problems", "Problem",
           "Task", "Addition", "Chain", "Countdown", "Expression", "reachable", "solve",
           "get_tokenizer", "encode", "decode", "EOT", "SOT", "EOTH", "PAD", "NEWLINE",
           "NOT_TEXT", "TOKENIZER"]
