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

from .addition import Addition
from .chain import Chain
from .base import Problem, Task
from .countdown import Countdown, reachable, solve
from .expression import Expression
from .tokenizer import EOT, EOTH, NEWLINE, PAD, SOT, decode, encode, get_tokenizer
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


def sample_problems(task, n, difficulties, seed, exclude=frozenset()) -> list[Problem]:
    """n problems, problem i at difficulties[i % len(difficulties)], from random.Random(seed).

    A question in `exclude` (a set of question strings, e.g. the test set's) is resampled, up to
    1000 tries per problem. Duplicates within the returned list are allowed: at low difficulty
    there are fewer distinct problems than a training set asks for (1-digit addition has 100).
    """
    task = get_task(task) if isinstance(task, str) else task
    difficulties = list(difficulties)
    if not difficulties:
        raise ValueError("difficulties is empty")
    for d in difficulties:
        task.validate(d)
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        d = difficulties[i % len(difficulties)]
        for _ in range(1000):
            p = task.sample(rng, d)
            if p.question not in exclude:
                break
        else:
            raise ValueError(f"could not sample a {task.name} problem of difficulty {d} "
                             "outside `exclude` in 1000 tries (too few distinct problems?)")
        problems.append(p)
    return problems


__all__ = ["TASKS", "get_task", "sample_problems", "Problem", "Task", "Addition", "Chain",
           "Countdown", "Expression", "reachable", "solve", "get_tokenizer", "encode", "decode",
           "EOT", "SOT", "EOTH", "PAD", "NEWLINE", "TOKENIZER"]
