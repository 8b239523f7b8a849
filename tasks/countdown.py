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
1. Difficulty = how many numbers (2..5). By default (NUMBERS) numbers are drawn from 1..12,
   and with probability 1/4 one of them is replaced by 25, 50, 75 or 100 (the TV show's
   "large" numbers). The target is the end of a random solution path and must lie in 10..999
   (TARGETS), so every problem is solvable by construction. Both are settings: numbers
   "1-100" draws each number uniformly from 1..100 (no large ones), targets "1-100" keeps the
   paths that end in 1..100.
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
5. A test set may come from a file in the formats in public use (read_problems); a problem
   these rules cannot solve is the caller's to refuse (reachable). Public checkers differ: the
   rules here and Stream of Search's allow no fraction and no negative number in between;
   TinyZero's evaluates one expression and allows both.
"""

import json
import random
import re
from functools import lru_cache

from .base import NUMBER, Problem, Task, parse_answer_line, split_lines

NUMBERS = "1-12+25,50,75,100"  # drawn from 1..12; in 1 problem of 4, one is a large one
TARGETS = "10-999"  # a path that ends outside this range is drawn again
LARGE_SHARE = 0.25
MAX_DRAWS = 10000  # random paths per problem before a setting is called impossible
MAX_NUMBER = 10 ** 6  # the largest number or target a test file may hold
STEP_LINE = re.compile(rf"({NUMBER})([-+*/])({NUMBER})=({NUMBER})")


def parse_range(text):
    """'10-999' -> (10, 999), both ends included; ValueError unless 0 <= lo <= hi."""
    m = re.fullmatch(r"(\d+)-(\d+)", text)
    if m is None or int(m.group(1)) > int(m.group(2)):
        raise ValueError(f"{text!r} is not a range: write lo-hi, e.g. 1-100")
    return int(m.group(1)), int(m.group(2))


def parse_numbers(text):
    """'1-12+25,50,75,100' -> ((1, 12), (25, 50, 75, 100)): the range every number is drawn
    from, and the large ones, one of which replaces a number in 1 problem of 4 (LARGE_SHARE);
    '1-100' -> ((1, 100), ()). ValueError for anything else."""
    small, plus, large = text.partition("+")
    try:
        lo, hi = parse_range(small)
        extra = tuple(int(x) for x in large.split(",")) if plus else ()
    except ValueError:
        raise ValueError(f"{text!r} is not a number setting: write lo-hi, e.g. 1-100, or "
                         "lo-hi+a,b,.. for large numbers a, b, .. (1-12+25,50,75,100)") from None
    if lo < 1 or any(x < 1 for x in extra):
        raise ValueError(f"{text!r}: the numbers start at 1")
    return (lo, hi), extra


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


def solutions(numbers, target):
    """Every solution's step lines, one list per distinct path, in the solver's order."""
    def paths(nums):
        if len(nums) == 1:
            if nums[0] == target:
                yield []
            return
        for line, after in moves(nums):
            if _reachable(after, target):
                yield from ([line] + rest for rest in paths(after))
    seen = set()  # (equal numbers give the same step line twice)
    for path in paths(tuple(sorted(numbers))):
        if tuple(path) not in seen:
            seen.add(tuple(path))
            yield path


def solve(numbers, target):
    """The step lines of a solution (the first one in the solver's order), or None."""
    return next(solutions(numbers, target), None)


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
    tool_end = "\n"  # what follows the calculator's result: a path's step line ends there
    calculators = ("result", "judge")  # Calculator's modes

    def __init__(self, calculator=None, numbers=NUMBERS, targets=TARGETS):
        # calculator: None, "result" or "judge"; numbers, targets: the draw, as parse_numbers
        # and parse_range read them (ValueError if they do not)
        self.tool = Calculator(calculator, end=self.tool_end) if calculator else None
        self.setting = {"numbers": numbers, "targets": targets}  # as written, for copies
        (self.lo, self.hi), self.large = parse_numbers(numbers)
        self.targets = parse_range(targets)

    def with_calculator(self, mode):
        if mode != "off" and mode not in self.calculators:
            raise ValueError(f"{self.name} has no calculator {mode!r}; choose off, "
                             + ", ".join(self.calculators))
        return type(self)(None if mode == "off" else mode, **self.setting)

    def problem(self, numbers, target):
        """The problem of reaching `target` from `numbers` (in the order written)."""
        question = " ".join(map(str, numbers)) + f" T: {target}"
        return Problem(question=question, answer=str(target), difficulty=len(numbers),
                       data=(tuple(numbers), target))

    def sample(self, rng, difficulty):
        self.validate(difficulty)
        for _ in range(MAX_DRAWS):  # until a path ends inside the targets (most do)
            numbers = [rng.randint(self.lo, self.hi) for _ in range(difficulty)]
            if self.large and rng.random() < LARGE_SHARE:
                numbers[rng.randrange(difficulty)] = rng.choice(self.large)
            # A random solution path: combine two random numbers with a random valid op.
            pool = list(numbers)
            while len(pool) > 1:
                a, b = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
                results = [apply_op(x, op, y) for x, y in ((a, b), (b, a)) for op in "+-*/"]
                pool.append(rng.choice([c for c in results if c is not None]))
            if self.targets[0] <= pool[0] <= self.targets[1]:
                return self.problem(numbers, pool[0])
        raise ValueError(f"no {difficulty} numbers from {self.setting['numbers']} reached a "
                         f"target in {self.setting['targets']} in {MAX_DRAWS} random paths: "
                         "widen the targets")

    def could_draw(self, p):
        """Could sample() have drawn p's numbers and target (whether or not by p's path)?"""
        numbers, target = p.data
        out = [x for x in numbers if not self.lo <= x <= self.hi]
        return (len(out) == 0 or len(out) == 1 and out[0] in self.large) and \
            self.targets[0] <= target <= self.targets[1]

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
        # it leave (the claims themselves are what the learned recheck judges); a finished solution
        # also has an answer line naming the target, at least one step, and only the target left.
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


# ---------------------------------------------------------------- Test files in public formats

def read_problems(task, path):
    """The countdown problems of a JSON-lines file, one a line, with the fields in public use:
    {"nums": [30, 100, 93], "target": 23} (the fields of Stream of Search's and TinyZero's data;
    "numbers" for "nums" too) or {"input": "30,100,93", "output": "23"}; other keys are ignored,
    blank lines skipped. Numbers and targets are integers from 0 to MAX_NUMBER. Returns
    [(line number, Problem)]; a line that is none of these, or whose count of numbers is not a
    difficulty here, raises ValueError naming the file and the line. Whether a problem can be
    solved under these rules is the caller's to ask (reachable)."""
    formats = '{"nums": [30, 100, 93], "target": 23} or {"input": "30,100,93", "output": "23"}'
    rows = []
    with open(path, encoding="utf-8-sig") as f:  # (-sig: a byte-order mark is not a problem)
        try:
            lines = f.readlines()
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a text file (UTF-8)") from None
        for n, text in enumerate(lines, 1):
            if not text.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(text)
            except (ValueError, RecursionError):  # (nested too deep for the parser)
                raise ValueError(f"{where} is not JSON; write one problem per line, as "
                                 f"{formats}") from None
            numbers, target = _numbers_and_target(row)
            if numbers is None or target is None:
                raise ValueError(f"{where} is not a countdown problem: {text.strip()[:60]!r};"
                                 f" write {formats}")
            if len(numbers) not in task.difficulties:
                raise ValueError(f"{where}: countdown here takes {min(task.difficulties)} to "
                                 f"{max(task.difficulties)} numbers, not {len(numbers)}")
            rows.append((n, task.problem(numbers, target)))
    return rows


def _numbers_and_target(row):
    """A file row's (numbers, target) as ints in 0..MAX_NUMBER; None for what is not there."""
    def integer(x):
        if isinstance(x, str) and re.fullmatch(r"[0-9]{1,7}", x.strip()):
            x = int(x)
        ok = isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_NUMBER
        return x if ok else None

    if not isinstance(row, dict):
        return None, None
    if "nums" in row or "numbers" in row:
        numbers, target = row.get("nums", row.get("numbers")), row.get("target")
    else:
        numbers, target = row.get("input"), row.get("output")
        if isinstance(numbers, str):
            numbers = numbers.replace(",", " ").split()
    if isinstance(numbers, list):
        numbers = [integer(x) for x in numbers]
    if not isinstance(numbers, list) or None in numbers:
        numbers = None
    return numbers, integer(target)


# ---------------------------------------------------------------- Stream of Search
#
# Stream of Search (Gandhi et al. 2024): train on the whole search, dead ends and backtracking
# included, not only on the solution it ends with. A symbolic search writes the trace; the
# checkers below judge any text as one, so a model's traces can be graded exactly too.
#
#     Q: 11 3 7 T: 32       search_trace((11, 3, 7), 32, "dfs-near")
#     11*3=33 (7 33)        one explored step per line, indented by its depth, then the
#      33-7=26 x            numbers it leaves (sorted), or for a leaf " x" (not the target)
#      33+7=40 x            or " !" (the target)
#      33*7=231 x
#     7*3=21 (11 21)        backtracking: the indentation goes back up
#      21+11=32 !
#     7*3=21                the found path, unindented: exactly a completion Countdown.check
#     21+11=32              accepts
#     A: 32                 ("A: none" after a failed search: never a right answer)
#
# Choices, on purpose:
# 1. A line is judged against the state its parent line claims to leave (the nearest earlier
#    line one level up; the question's numbers for depth 0), so a wrong line does not spoil its
#    whole subtree: only the lines that rely on what is wrong in it are wrong too. Every line
#    is right exactly when every claim is true, by induction; the path at the end is re-checked
#    from the question's numbers by trace_outcome_ok.
# 2. bfs-<k> is a beam: only the k best states of a level are expanded, so it can miss a
#    reachable target even with budget to spare (a failed trace, kept as Stream of Search keeps
#    them). The dfs strategies, given budget, search the whole tree and never miss.
# 3. No pruning and no merging of equal states: the tree is moves()'s, so the trace of a given
#    strategy and budget is a function of the question alone.
# 4. The budget counts trace lines, so it bounds the trace's length (what a model must fit in
#    its context). For bfs, that includes the lines of a beam node's path that are written
#    again before its children (a line's parent must be the nearest line one level up).

SEARCH_LINE = re.compile(rf"( *)({NUMBER})([-+*/])({NUMBER})=({NUMBER})"
                         rf" (?:\(({NUMBER}(?: {NUMBER})+)\)|(x|!))")
FAILED = "A: none"  # parse_answer_line rejects it, so Countdown.check never accepts it
DEFAULT_BUDGET = 24  # trace lines: ~110 tokens for 3 numbers, ~250 for 4 (tests/test_sos.py)


def near_target(after, target):
    """The first heuristic: how close the closest number left is to the target."""
    return min(abs(n - target) for n in after)


def sum_near_target(after, target):
    """The second heuristic: how close the sum of the numbers left is to the target."""
    return abs(sum(after) - target)


HEURISTICS = {"near": near_target, "sum": sum_near_target}
STRATEGIES = ("dfs-near", "dfs-sum", "bfs-2", "dfs-random")  # and "bfs-<k>" for any width k >= 1


def search_line(depth, step, after, target):
    """The trace line of the step `step` at `depth`, which leaves the sorted tuple `after`."""
    if len(after) == 1:
        return " " * depth + step + (" !" if after[0] == target else " x")
    return " " * depth + f"{step} ({' '.join(map(str, after))})"


def _ordered(state, target, heuristic):
    # sorted() is stable: ties keep moves() order, so the trace is deterministic
    return sorted(moves(state), key=lambda move: heuristic(move[1], target))


def _dfs(state, target, heuristic, depth, path, out, budget):
    """Depth-first below `state`, appending lines to `out`: the goal's path, or None."""
    for step, after in _ordered(state, target, heuristic):
        if len(out) >= budget:
            return None
        out.append(search_line(depth, step, after, target))
        if len(after) == 1:
            if after[0] == target:
                return path + [step]
        else:
            found = _dfs(after, target, heuristic, depth + 1, path + [step], out, budget)
            if found is not None:
                return found
    return None


def _bfs(root, target, heuristic, width, out, budget):
    """Breadth-first with a beam of `width` states per level: the goal's path, or None."""
    frontier = [((), root)]  # (path as ((step, after), ...) from the root, state)
    shown = ()  # the path of the last line written: the lines a next line may hang below
    while frontier:
        children = []
        for path, state in frontier:
            # Write again the part of the path the last lines left, so that the children's
            # parent is the nearest line one level up.
            common = 0
            while common < min(len(shown), len(path)) and shown[common] == path[common]:
                common += 1
            for depth in range(common, len(path)):
                if len(out) >= budget:
                    return None
                out.append(search_line(depth, *path[depth], target))
            for step, after in _ordered(state, target, heuristic):
                if len(out) >= budget:
                    return None
                out.append(search_line(len(path), step, after, target))
                shown = path + ((step, after),)
                if len(after) == 1:
                    if after[0] == target:
                        return [s for s, _ in shown]
                else:
                    children.append((shown, after))
        # the next level: the best children of this whole level (ties: the order explored)
        frontier = sorted(children, key=lambda child: heuristic(child[1], target))[:width]
    return None


def search_trace(numbers, target, strategy="dfs-near", budget=DEFAULT_BUDGET, seed=0):
    """A symbolic search's trace as text, and whether it found the target: (text, found).

    strategy: "dfs-near" / "dfs-sum" (depth-first, children closest to the target first by
    near_target / sum_near_target), "dfs-random" (depth-first, the children in a uniformly
    random order drawn from seed: the baseline a learned search must beat), or "bfs-<k>" (a
    beam of k states per level, near_target). budget: the most trace lines before giving up. A
    failed trace ends with FAILED."""
    kind, _, rest = strategy.partition("-")
    rng = random.Random(seed)
    heuristics = {**HEURISTICS, "random": lambda after, target: rng.random()}
    if not (kind == "dfs" and rest in heuristics
            or kind == "bfs" and rest.isdigit() and int(rest) >= 1):
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)} "
                         "(or bfs-<k>)")
    root, out = tuple(sorted(numbers)), []
    if len(root) <= 1:
        path = [] if root == (target,) else None  # nothing to search
    elif kind == "dfs":
        path = _dfs(root, target, heuristics[rest], 0, [], out, budget)
    else:
        path = _bfs(root, target, near_target, int(rest), out, budget)
    if path is None:
        return "\n".join(out + [FAILED]), False
    return "\n".join(out + path + [f"A: {target}"]), True


def _split_trace(text):
    """(explored lines, solution lines): the solution is the last line if it starts with "A:",
    with the bare step lines right before it; every other line is an explored line."""
    lines = split_lines(text)
    if not lines[-1].startswith("A:"):
        return lines, []
    k = len(lines) - 1
    while k > 0 and STEP_LINE.fullmatch(lines[k - 1]):
        k -= 1
    return lines[:k], lines[k:]


def trace_solution(text):
    """The completion a trace ends with (its found path and answer line), or None."""
    solution = _split_trace(text)[1]
    return "\n".join(solution) if solution else None


def trace_outcome_ok(p, text):
    """Outcome verifier of a trace: the solution it ends with is right (Countdown.check, from
    the question's numbers). What the trace explored before it is not read."""
    solution = trace_solution(text)
    return solution is not None and Countdown().check(p, solution)


def trace_lines_ok(p, text):
    """Process verifier of a trace: one label per explored line (the solution at the end is not
    labelled; see trace_outcome_ok). A line is right iff it parses, hangs at most one level
    below the line before it, its operands are left in its parent's claimed state, its
    arithmetic is right, and the state (or leaf mark) it writes is exactly what it leaves."""
    numbers, target = p.data
    explored = _split_trace(text)[0]
    claimed = {-1: tuple(sorted(numbers))}  # depth -> the state the last line there claims
    labels, last_depth = [], -1
    for line in explored:
        depth = len(line) - len(line.lstrip(" "))
        m = SEARCH_LINE.fullmatch(line)
        parent = claimed.get(depth - 1) if depth <= last_depth + 1 else None
        claimed[depth] = None  # until this line says what it leaves: its children are wrong
        last_depth = depth
        if m is None:
            labels.append(False)
            continue
        a, op, b, c = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
        state, mark = m.group(6), m.group(7)
        if state is not None:
            claimed[depth] = tuple(map(int, state.split()))
        after = None if parent is None else apply_step(parent, line.split()[0])
        if after is None:
            labels.append(False)
        elif len(after) == 1:
            labels.append(mark == ("!" if c == target else "x"))
        else:
            labels.append(claimed[depth] == tuple(sorted(after)))
    return labels


def trace_backtracks(text):
    """Does the trace back out of a dead end (a line marked x) before it finds the target (the
    first line marked !)? Read from the text alone; False without a ! line."""
    explored = _split_trace(text)[0]
    goals = [k for k, line in enumerate(explored) if line.endswith(" !")]
    return bool(goals) and any(line.endswith(" x") for line in explored[:goals[0]])


# -----------------------------------------------------------------------------
# Tools and the trace task for Stream of Search (sos.py)

PARTIAL_LINE = re.compile(rf"( *)({NUMBER})([-+*/])({NUMBER})=")
DONE_LINE = re.compile(rf"( *)({NUMBER}[-+*/]{NUMBER}={NUMBER})")


class Calculator:
    """What the program writes when the model writes "=" (the sampler calls it: model.use_tool).

    "result": the result of the line's `a op b` (nothing when it is not one or the operation is
    not allowed), as Cobbe et al. 2021 gave GSM8K's models a calculator. "judge": the program
    as an environment answering a search trace's every step, so the model only chooses which
    step to try next and when to back up: the result and the numbers it leaves, or a leaf's
    verdict ` x`; a step on numbers not left (or not allowed) gets ` x` too; at the goal, ` !`
    and then the found path and the answer. Total on any text."""

    trigger = "="

    def __init__(self, mode="result", end=""):
        if mode not in ("result", "judge"):
            raise ValueError(f"unknown calculator {mode!r}; choose result or judge")
        self.mode, self.end = mode, end  # end: what follows a result (a path's line ends)

    def __call__(self, p, text):
        lines = text.split("\n")
        m = PARTIAL_LINE.fullmatch(lines[-1])
        c = None if m is None else apply_op(int(m.group(2)), m.group(3), int(m.group(4)))
        if self.mode == "result":
            return "" if c is None else str(c) + self.end
        if m is None or c is None:
            return " x" if lines[-1].endswith("=") else ""
        numbers, target = p.data
        state = {-1: (tuple(sorted(numbers)), ())}  # depth -> (numbers left, path to there)
        for line in lines:
            d = DONE_LINE.match(line) or PARTIAL_LINE.match(line)
            if d is None:
                continue
            depth = len(d.group(1))
            step = d.group(2) if d.re is DONE_LINE else line.strip() + str(c)
            parent = state.get(depth - 1)
            after = None if parent is None else apply_step(parent[0], step)
            state = {k: v for k, v in state.items() if k < depth}
            if after is not None:
                state[depth] = (tuple(sorted(after)), parent[1] + (step,))
        here = state.get(len(m.group(1)))
        if here is None:  # an operand that is not left
            return f"{c} x"
        after, path = here
        if len(after) > 1:
            return f"{c} ({' '.join(map(str, after))})"
        if after[0] != target:
            return f"{c} x"
        return f"{c} !\n" + "\n".join(path) + f"\nA: {target}"


class CountdownTraces(Countdown):
    """Countdown whose completions are search traces: the gold completion is a symbolic
    search's trace (SoS mixes strategies: each problem's is dfs-near or dfs-sum, by its key),
    failed ones included; a trace is right when the path it ends with is."""

    name = "countdown-traces"
    mix = ("dfs-near", "dfs-sum")
    tool_end = ""  # a trace line goes on after the result

    def __init__(self, calculator=None, budget=DEFAULT_BUDGET, **setting):
        super().__init__(calculator, **setting)
        self.budget = budget

    def strategy(self, p):
        return self.mix[sum(map(ord, repr(self.key(p)))) % len(self.mix)]

    def gold_completion(self, p):
        return search_trace(*p.data, strategy=self.strategy(p), budget=self.budget)[0]

    def extract_answer(self, text):
        solution = trace_solution(text)
        return None if solution is None else Countdown.extract_answer(self, solution)

    def check(self, p, text):
        return trace_outcome_ok(p, text)


def trace_stats(p, text):
    """What a trace shows, read from its text: explored lines, those with a slip (not
    trace_lines_ok), goal claims (` !`) and the false ones, backtracking before the goal."""
    explored, labels = _split_trace(text)[0], trace_lines_ok(p, text)
    claims = [line for line in explored if line.endswith(" !")]
    false = [line for line in claims if not line[:-2].endswith(f"={p.data[1]}")]
    return {"lines": len(labels), "slips": labels.count(False), "claims": len(claims),
            "false_claims": len(false), "backtracks": trace_backtracks(text)}
