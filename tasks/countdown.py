"""
Countdown: reach a target from a handful of numbers with + - * /, each number used exactly once.

    Q: 25 7 4 3 T: 39
    25+7=32        one operation per line: two numbers still available -> their result
    32+4=36
    36+3=39
    A: 39

Many solutions and many dead ends: this is the search task. Rules: every intermediate is a
non-negative integer, a-b only when a >= b, a/b only when b != 0 and b divides a, and after the
last step exactly one number, the target, is left. The brute-force solver below decides exactly
whether a target is still reachable, which is what makes a step "good" for the process verifier.

Test: python -m pytest tests/test_tasks.py -k countdown

Choices, on purpose:
1. Difficulty = how many numbers (2..5). Numbers are drawn from 1..12, and with probability
   1/4 one of them is replaced by 25, 50, 75 or 100 (the TV show's "large" numbers). The
   target is the end of a random solution path and must lie in 10..999, so every problem is
   solvable by construction.
2. The gold rationale is the solver's first solution (solve()), not the random path that made
   the problem: it is a function of the question alone, so the same question always gets the
   same gold steps. Operands are written larger first ("25+7", "32-4").
3. The answer line always repeats the target, so p.answer is the target. What majority vote
   should group is the solution, so extract_answer returns the whole parsed trace
   ("25+7=32;32+4=36;36+3=39;A: 39"). Traces that differ only in operand order or step order
   are different answers to it (a simplification).
4. The process verifier labels a step right iff it is valid in the state left by the steps
   before it and the target is still reachable from the new state. After an invalid step the
   state is undefined, so every later line is wrong.
"""

import re
from functools import lru_cache

from .base import NUMBER, Problem, Task, parse_answer_line, split_lines

LARGE = (25, 50, 75, 100)
TARGETS = range(10, 1000)  # targets outside this range are resampled
STEP_LINE = re.compile(rf"({NUMBER})([-+*/])({NUMBER})=({NUMBER})")


def apply_op(a, op, b):
    """a op b under the rules, or None where the rules forbid it (negative, inexact, by zero)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    return a // b if b != 0 and a % b == 0 else None


def moves(nums):
    """Every step from the sorted tuple nums: (step line, sorted tuple after the step)."""
    for i in range(len(nums)):
        for j in range(i + 1, len(nums)):
            # Sorted ascending, so a >= b: write the larger first. The other order adds no new
            # result: b+a and b*a are the same, b-a is valid only if b == a, and b/a only if
            # b == a or b == 0 (giving 0, which a*0 already gives).
            b, a = nums[i], nums[j]
            rest = nums[:i] + nums[i + 1:j] + nums[j + 1:]
            for op in "+-*/":
                c = apply_op(a, op, b)
                if c is not None:
                    yield f"{a}{op}{b}={c}", tuple(sorted(rest + (c,)))


@lru_cache(maxsize=1 << 18)
def _reachable(nums, target):
    if len(nums) == 1:
        return nums[0] == target
    return any(_reachable(after, target) for _, after in moves(nums))


def reachable(numbers, target):
    """Can `target` be made using every one of `numbers` exactly once? (memoised DFS)"""
    nums = tuple(sorted(numbers))
    return len(nums) > 0 and _reachable(nums, target)


def solve(numbers, target):
    """The step lines of a solution (the first one in the solver's order), or None."""
    nums = tuple(sorted(numbers))
    if not reachable(nums, target):
        return None
    steps = []
    while len(nums) > 1:
        # Some move keeps the target reachable, because the current state reaches it.
        line, nums = next((s, after) for s, after in moves(nums) if _reachable(after, target))
        steps.append(line)
    return steps


def apply_step(pool, line):
    """The multiset (a list) after step `line`, or None if the line is not a valid step: it does
    not parse, an operand is not available (a number used twice needs two copies), or the
    arithmetic is wrong or breaks the rules."""
    m = STEP_LINE.fullmatch(line)
    if m is None:
        return None
    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    if apply_op(a, op, b) != c:
        return None
    rest = list(pool)
    for x in (a, b):
        if x not in rest:
            return None
        rest.remove(x)
    return rest + [c]


class Countdown(Task):
    name = "countdown"
    difficulties = (2, 3, 4, 5)  # how many numbers
    default_difficulties = {"cpu": ("2-4", "2-4"), "gpu": ("2-5", "2-5")}  # (train, test)

    def sample(self, rng, difficulty):
        self.validate(difficulty)
        while True:  # resample until the path ends inside TARGETS (most do)
            numbers = [rng.randint(1, 12) for _ in range(difficulty)]
            if rng.random() < 0.25:
                numbers[rng.randrange(difficulty)] = rng.choice(LARGE)
            # A random solution path: combine two random numbers with a random valid op.
            pool = list(numbers)
            while len(pool) > 1:
                a, b = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
                results = [apply_op(x, op, y) for x, y in ((a, b), (b, a)) for op in "+-*/"]
                pool.append(rng.choice([c for c in results if c is not None]))
            if pool[0] in TARGETS:
                target = pool[0]
                question = " ".join(map(str, numbers)) + f" T: {target}"
                return Problem(question=question, answer=str(target), difficulty=difficulty,
                               data=(tuple(numbers), target))

    def key(self, p):
        # the same numbers in another order: the same problem (the solver sorts them, so even
        # the gold solution is the same)
        return tuple(sorted(p.data[0])), p.data[1]

    def rationale(self, p):
        return solve(*p.data)

    def hint(self, p):
        # The answer alone (the target) is already in the question, so the hint is a solution.
        return " ".join(self.rationale(p))

    def extract_answer(self, text):
        lines = split_lines(text)
        answer = parse_answer_line(lines[-1])
        if answer is None or not all(STEP_LINE.fullmatch(line) for line in lines[:-1]):
            return None
        return ";".join(lines)

    def check(self, p, text):
        numbers, target = p.data
        lines = split_lines(text)
        if parse_answer_line(lines[-1]) != str(target):
            return False
        pool = list(numbers)
        for line in lines[:-1]:
            pool = apply_step(pool, line)
            if pool is None:
                return False
        return pool == [target]

    def recheck(self, text):
        # The arithmetic of each step line, recomputed from its operands ("x" where the rules
        # forbid the operation). The rest (operands still left, the target reached) is
        # rules_ok's.
        lines = split_lines(text)
        if parse_answer_line(lines[-1]) is not None:
            lines = lines[:-1]
        steps = []
        for line in lines:
            m = STEP_LINE.fullmatch(line)
            if m is None:
                return None
            c = apply_op(int(m.group(1)), m.group(2), int(m.group(3)))
            steps.append((line[:line.index("=") + 1], m.group(4), "x" if c is None else str(c)))
        return steps

    def rules_ok(self, p, text, finished=True):
        # The bookkeeping around the arithmetic, by rule: every line but a final answer line is
        # a step whose two operands are still left, in the state that the claimed results before
        # it leave (the claims themselves are what GenRM-CoT judges); a finished solution also
        # has an answer line naming the target, at least one step, and only the target left.
        numbers, target = p.data
        lines = split_lines(text)
        answer = parse_answer_line(lines[-1])
        if answer is not None:
            lines = lines[:-1]
        elif finished:
            return False
        pool = list(numbers)
        for line in lines:
            m = STEP_LINE.fullmatch(line)
            if m is None:
                return False
            for x in (int(m.group(1)), int(m.group(3))):
                if x not in pool:
                    return False
                pool.remove(x)
            pool.append(int(m.group(4)))
        if not finished:
            return answer is None
        return answer == str(target) and len(lines) > 0 and pool == [target]

    def check_steps(self, p, text):
        numbers, target = p.data
        lines = split_lines(text)
        pool, labels = list(numbers), []
        for k, line in enumerate(lines):
            if k == len(lines) - 1 and line.startswith("A:"):
                labels.append(self.check(p, text))
            else:
                # An answer line before the end is an invalid step; so is anything after one.
                pool = None if pool is None else apply_step(pool, line)
                labels.append(pool is not None and reachable(pool, target))
        return labels
