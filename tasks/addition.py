"""
Addition of two n-digit numbers with a digit-by-digit scratchpad: STaR's arithmetic task.

Follows STaR (Zelikman et al. 2022, arXiv 2203.14465, section 4.2), which used the scratchpad
of Nye et al. 2021 ("Show your work", arXiv 2112.00114): one line per column, right to left,
carrying the partial result and the carry along.

    Q: 624+257
    4+7+0=11 1 C1        digit a + digit b + carry in = column sum, partial result, carry out
    2+5+1=8 81 C0
    6+2+0=8 881 C0
    A: 881

Test: python -m pytest tests/test_tasks.py -k addition

Departures from the papers, on purpose:
1. The scratchpad is written as plain lines ("a+b+c=s partial Ccarry"), not Nye et al.'s
   bracketed list format: one step per line is what the search methods expand on.
2. Both operands have exactly n digits (leading digit nonzero; 0..9 when n = 1), so the
   difficulty is exactly the number of columns.
3. The process verifier (Task's default) compares step k with gold step k character for
   character: addition has one right scratchpad, so any other line there is a wrong step.
"""

from .base import Problem, Task


class Addition(Task):
    name = "addition"
    difficulties = tuple(range(1, 13))  # number of digits of each operand
    default_difficulties = {"cpu": ("1-5", "1-6"), "gpu": ("1-8", "1-10")}  # (train, test)

    def sample(self, rng, difficulty):
        self.validate(difficulty)
        lo = 0 if difficulty == 1 else 10 ** (difficulty - 1)
        a, b = rng.randint(lo, 10 ** difficulty - 1), rng.randint(lo, 10 ** difficulty - 1)
        return Problem(question=f"{a}+{b}", answer=str(a + b), difficulty=difficulty, data=(a, b))

    def key(self, p):
        return tuple(sorted(p.data))  # a+b and b+a: the same sum, the same columns

    def rationale(self, p):
        a, b = (str(x) for x in p.data)
        steps, partial, carry = [], "", 0
        # Columns right to left, as by hand; the partial result grows at its front.
        for da, db in zip(reversed(a), reversed(b)):
            s = int(da) + int(db) + carry
            partial = str(s % 10) + partial
            steps.append(f"{da}+{db}+{carry}={s} {partial} C{s // 10}")
            carry = s // 10
        return steps
