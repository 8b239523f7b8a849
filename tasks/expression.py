"""
Integer expressions with + - * and parentheses, reduced one operation per line.

    Q: (3+4)*5-6
    7*5-6          the first operation in evaluation order is done, the rest rewritten
    35-6
    A: 29

Difficulty = number of operations; a problem of difficulty d has d-1 step lines, then the answer.

Test: python -m pytest tests/test_tasks.py -k expression

Choices, on purpose:
1. Operands are single digits 1..9 (no 0, so "x*0" never collapses a whole subtree in one step).
2. A problem is a random binary tree rendered with minimal parentheses and parsed back (usual
   precedence, left-associative); the parsed tree is the canonical one. Problems where any
   subexpression is negative or above 999 are resampled, so every gold step shows only
   non-negative numbers and no unary minus is ever needed.
3. The process verifier is value-based: step i (1-based) is right iff it parses, has exactly
   d-i operators and evaluates to the answer. So a corrupted step is flagged alone and the
   untouched later steps stay right; a step that jumps to another expression with the right
   value and operator count is accepted (a simplification: it is not checked to be one
   reduction of the line before).
4. Our own recursive-descent parser, length-capped; eval() is never used on text.
"""

import re

from .base import Problem, Task

MAX_LEN = 200    # longer lines are not parsed: garbage stays cheap
MAX_VALUE = 999  # largest value any subexpression of a problem may take
MAX_DEPTH = 40   # at most this many "(" in a parsed line (recursion depth)
PREC = {"+": 1, "-": 1, "*": 2}
_TOKEN = re.compile(r"0|[1-9]\d{0,29}|[-+*()]")

# A tree is an int (a leaf) or a tuple (op, left, right).


def evaluate(t):
    if isinstance(t, int):
        return t
    op, a, b = t[0], evaluate(t[1]), evaluate(t[2])
    return a + b if op == "+" else a - b if op == "-" else a * b


def n_ops(t):
    return 0 if isinstance(t, int) else 1 + n_ops(t[1]) + n_ops(t[2])


def render(t):
    """The expression with minimal parentheses: a child is wrapped only when it binds more
    loosely than its parent, or equally loosely on the right of "-" (a-(b+c) != a-b+c)."""
    if isinstance(t, int):
        return str(t)
    op, a, b = t
    left, right = render(a), render(b)
    if not isinstance(a, int) and PREC[a[0]] < PREC[op]:
        left = f"({left})"
    if not isinstance(b, int) and (PREC[b[0]] < PREC[op] or (PREC[b[0]] == PREC[op] and op == "-")):
        right = f"({right})"
    return f"{left}{op}{right}"


def parse(text):
    """The tree of an expression over canonical numbers, + - * and parentheses (no spaces, no
    unary minus), with the usual precedence and left associativity; None if it does not parse."""
    # Bounded length and nesting keep garbage cheap and the recursion shallow.
    if not 0 < len(text) <= MAX_LEN or text.count("(") > MAX_DEPTH:
        return None
    toks = _TOKEN.findall(text)
    if "".join(toks) != text:  # a character the grammar does not know, or a leading zero
        return None
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def expr():  # expr := term (("+" | "-") term)*
        nonlocal pos
        t = term()
        while t is not None and peek() in ("+", "-"):
            op, pos = toks[pos], pos + 1
            r = term()
            t = None if r is None else (op, t, r)
        return t

    def term():  # term := factor ("*" factor)*
        nonlocal pos
        t = factor()
        while t is not None and peek() == "*":
            pos += 1
            r = factor()
            t = None if r is None else ("*", t, r)
        return t

    def factor():  # factor := number | "(" expr ")"
        nonlocal pos
        tok = peek()
        if tok in (None, "+", "-", "*", ")"):
            return None
        pos += 1
        if tok != "(":
            return int(tok)
        t = expr()
        if t is None or peek() != ")":
            return None
        pos += 1
        return t

    t = expr()
    return t if pos == len(toks) else None


def _random_tree(rng, k):
    """A random binary tree with k operations (+ - *) over digits 1..9."""
    if k == 0:
        return rng.randint(1, 9)
    left = rng.randint(0, k - 1)
    return (rng.choice("+-*"), _random_tree(rng, left), _random_tree(rng, k - 1 - left))


def _in_range(t):
    """Is every subexpression of t between 0 and MAX_VALUE?"""
    if isinstance(t, int):
        return True
    return 0 <= evaluate(t) <= MAX_VALUE and _in_range(t[1]) and _in_range(t[2])


def reduce_first(t):
    """t with its first operation in evaluation order done: the first node in post-order whose
    children are both numbers (precedence and parentheses are already in the tree's shape)."""
    op, a, b = t
    if isinstance(a, int) and isinstance(b, int):
        return evaluate(t)
    if not isinstance(a, int):
        return (op, reduce_first(a), b)
    return (op, a, reduce_first(b))


class Expression(Task):
    name = "expression"
    difficulties = tuple(range(1, 9))  # number of operations
    default_difficulties = {"cpu": ("1-4", "1-5"), "gpu": ("1-6", "1-8")}  # (train, test)

    def sample(self, rng, difficulty):
        self.validate(difficulty)
        # Rejection sampling; even at 8 operations about 1 tree in 4 passes _in_range.
        while True:
            t = parse(render(_random_tree(rng, difficulty)))  # the parsed tree is canonical
            if _in_range(t):
                return Problem(question=render(t), answer=str(evaluate(t)),
                               difficulty=difficulty, data=t)

    def rationale(self, p):
        t, steps = p.data, []
        while n_ops(t) > 1:  # the last reduction is the answer line, not a step
            t = reduce_first(t)
            steps.append(render(t))
        return steps

    def step_ok(self, p, i, line):
        need = p.difficulty - (i + 1)  # step i+1 (1-based) has d-(i+1) operators left
        if need < 1:
            return False
        t = parse(line)
        return t is not None and n_ops(t) == need and str(evaluate(t)) == p.answer
