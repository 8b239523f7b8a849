"""
A task's problems as a language model's text: one line per problem, "8+8*8+5=3" (bare) or
"8+8*8+5:(6,8,3)3" (showing the result of each step of its rationale), packed whole into rows
of fixed length. Quiet-STaR (quiet_star.py) trains on such text and is measured on the answers
of the bare lines, the tokens that are hard to predict without the work.

Test: python -m pytest tests/test_quiet_star.py -k "pack or line"
"""

import random

import torch

from .tokenizer import PAD, encode


def scratch(task, p):
    """The work a worked line shows: the result of each step of the task's rationale, "6,8,3"."""
    return ",".join(step.rsplit("=", 1)[-1] for step in task.rationale(p))


def line(task, p, worked):
    """"8+8*8+5=3\n" (bare) or "8+8*8+5:(6,8,3)3\n" (worked): ":" where a bare line has "=",
    so the token before a bare answer announces a digit, never a bracket."""
    if worked:
        return f"{p.question}:({scratch(task, p)}){p.answer}\n"
    return f"{p.question}={p.answer}\n"


def show_work(n, fraction, seed):
    """Which of n lines show their work: each one independently, with probability fraction."""
    rng = random.Random(seed)
    return [rng.random() < fraction for _ in range(n)]


def pack(task, problems, worked, T):
    """Whole lines packed into right-padded rows of T+1 tokens: (seqs, ans), both (N, T+1); ans is
    the problem's index at the answer digits of bare lines (the hard tokens), -1 elsewhere."""
    rows, ans, cur, cur_ans = [], [], [], []
    for i, (p, w) in enumerate(zip(problems, worked)):
        text = line(task, p, w)
        ids = encode(text)
        if len(ids) > T + 1:
            raise ValueError(f"line {text!r} is longer than the sequence ({T + 1})")
        if len(cur) + len(ids) > T + 1:  # a new row when the line does not fit
            rows.append(cur), ans.append(cur_ans)
            cur, cur_ans = [], []
        n_q = len(ids) - len(p.answer) - 1  # "a+b=" and any work shown: what follows is the answer
        cur += ids
        cur_ans += [-1] * n_q + [-1 if w else i] * len(p.answer) + [-1]  # the newline: -1
    rows.append(cur), ans.append(cur_ans)
    return (torch.tensor([r + [PAD] * (T + 1 - len(r)) for r in rows]),  # every row padded
            torch.tensor([a + [-1] * (T + 1 - len(a)) for a in ans]))    # to T+1
