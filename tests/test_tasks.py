"""
Tests for tasks/: the tokenizer, the three task families and their verifiers.

What they guard: gold completions pass both verifiers at every difficulty; each kind of wrong
completion fails (wrong answer, no answer line, truncated, empty, random text); the process
verifier flags exactly the corrupted step; the countdown solver agrees with a naive brute force;
the expression parser agrees with Python; the tokenizer round-trips every task's text; sampling
is deterministic; and no verifier ever raises on garbage.

Run: python -m pytest tests/test_tasks.py   (CPU only, a few seconds)
"""

import itertools
import random
import string

import pytest

from tasks import (EOT, NEWLINE, PAD, SOT, TASKS, Countdown, Problem, decode, encode, get_task,
                   get_tokenizer, reachable, sample_problems, solve)
from tasks import expression as E
from tasks.countdown import apply_op, apply_step, read_problems

N_PER_DIFFICULTY = 40  # 40 * (12 + 8 + 8 + 4) = 1280 problems across the four tasks


def problems(task, n=N_PER_DIFFICULTY, seed=0):
    return sample_problems(task, n * len(task.difficulties), task.difficulties, seed=seed)


def canonical(task, p):
    # Countdown's canonical "answer" is the whole solution (see tasks/countdown.py, choice 3).
    gold = task.gold_completion(p)
    return gold.replace("\n", ";") if task.name == "countdown" else p.answer


def random_printable(rng, n):
    return "".join(rng.choice(string.printable) for _ in range(n))


def corrupt_digit(rng, line):
    """line with one digit (at a random position) changed to a different digit 1..9, which never
    creates a leading zero, so eval() in the tests still reads it."""
    pos = rng.choice([i for i, ch in enumerate(line) if ch.isdigit()])
    new = rng.choice([d for d in "123456789" if d != line[pos]])
    return line[:pos] + new + line[pos + 1:]


# ---------------------------------------------------------------- formats pinned by the spec

def test_example_formats():
    add, expr, cd = get_task("addition"), get_task("expression"), get_task("countdown")
    p = Problem("624+257", "881", 3, (624, 257))
    assert add.prompt(p) == "Q: 624+257\n"
    assert add.prompt(p, hint=True) == "Q: 624+257\nH: 881\n"
    assert add.gold_completion(p) == "4+7+0=11 1 C1\n2+5+1=8 81 C0\n6+2+0=8 881 C0\nA: 881"

    p = Problem("(3+4)*5-6", "29", 3, E.parse("(3+4)*5-6"))
    assert expr.gold_completion(p) == "7*5-6\n35-6\nA: 29"
    # Value-based steps: right value and operator count, even if not the gold reduction...
    assert expr.check_steps(p, "30-2+1\n35-6\nA: 29") == [True, True, True]
    # ...but a step with the wrong number of operators left, or past the last one, is wrong.
    assert expr.check_steps(p, "35-6\n29\nA: 29") == [False, False, True]

    p = Problem("25 7 4 3 T: 39", "39", 4, ((25, 7, 4, 3), 39))
    text = "25+7=32\n32+4=36\n36+3=39\nA: 39"
    assert cd.check(p, text) and cd.check_steps(p, text) == [True] * 4
    assert cd.extract_answer(text) == "25+7=32;32+4=36;36+3=39;A: 39"
    assert cd.check(p, cd.gold_completion(p))
    assert cd.hint(p) == " ".join(cd.rationale(p))

    ch = get_task("chain")  # left to right, mod 10: ((8+8)*8+5) % 10
    p = Problem("8+8*8+5", "3", 3, (8, (("+", 8), ("*", 8), ("+", 5))))
    assert ch.gold_completion(p) == "8+8=6\n6*8=8\n8+5=3\nA: 3"
    assert ch.running(p.data) == ["6", "8", "3"]


def test_registry():
    assert set(TASKS) == {"addition", "chain", "countdown", "expression"}
    with pytest.raises(ValueError, match="choose from addition, chain, countdown, expression"):
        get_task("subtraction")


# ---------------------------------------------------------------- gold accepted, wrong rejected

@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_passes_both_verifiers(name):
    task = get_task(name)
    for p in problems(task):
        gold = task.gold_completion(p)
        assert task.check(p, gold), (p, gold)
        assert task.check(p, gold + "\n")  # a trailing newline is not an extra step
        assert task.check_steps(p, gold) == [True] * (gold.count("\n") + 1), (p, gold)
        assert task.extract_answer(gold) == canonical(task, p)
        # A gold prefix without the answer line (a partial trace, as beam search sees it) has
        # every step right but no outcome.
        steps = task.rationale(p)
        if steps:
            assert task.check_steps(p, "\n".join(steps)) == [True] * len(steps)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_wrong_completions_rejected(name):
    task, rng = get_task(name), random.Random(1)
    for p in problems(task, n=20):
        steps = task.rationale(p)
        wrong = str(int(p.answer) + rng.randint(1, 9))
        assert not task.check(p, task.completion(steps, wrong))
        assert task.check_steps(p, task.completion(steps, wrong))[-1] is False
        assert not task.check(p, task.completion(steps, "0" + p.answer))  # not canonical
        assert not task.check(p, "\n".join(steps))                   # no answer line
        assert not task.check(p, task.gold_completion(p) + "\n7")   # answer line not last
        # An answer line that is not the last line is wrong, even when the last line is right.
        twice = task.gold_completion(p) + f"\nA: {p.answer}"
        assert task.check_steps(p, twice)[-2:] == [False, name != "countdown"]
        gold = task.gold_completion(p)
        for cut in {0, 1, len(gold) // 2, len(gold) - 1}:           # truncated
            assert not task.check(p, gold[:cut])
        assert not task.check(p, "")
        assert task.check_steps(p, "") == [False]
        assert task.extract_answer("") is None


@pytest.mark.parametrize("name", sorted(TASKS))
def test_random_text_rejected(name):
    task, rng = get_task(name), random.Random(2)
    specials = ["<|endoftext|>", "<|startofthought|>", "<|endofthought|>", "<|pad|>", "\n"]
    for p in problems(task, n=5):
        for _ in range(20):
            for text in (random_printable(rng, rng.randint(1, 60)),
                         "".join(rng.choice(specials) for _ in range(rng.randint(1, 8)))):
                assert not task.check(p, text)
                assert not any(task.check_steps(p, text))


# ---------------------------------------------------------------- process verifier

@pytest.mark.parametrize("name", ["addition", "chain", "expression"])
def test_process_verifier_flags_only_the_corrupted_step(name):
    # Addition and chain compare lines with gold; expression is value-based: in all, a
    # corrupted step is flagged alone and the outcome (which reads only the answer line) is
    # still right.
    task, rng, tested = get_task(name), random.Random(3), 0
    for p in problems(task, n=10):
        steps = task.rationale(p)
        if not steps:
            continue
        k = rng.randrange(len(steps))
        bad = corrupt_digit(rng, steps[k])
        if name == "expression" and eval(bad) == int(p.answer):  # eval: our own test strings
            continue  # the change kept the value (e.g. a digit times 0): not a wrong step
        text = task.completion(steps[:k] + [bad] + steps[k + 1:], p.answer)
        expected = [True] * (len(steps) + 1)
        expected[k] = False
        assert task.check_steps(p, text) == expected, (p, text)
        assert task.check(p, text)
        tested += 1
    assert tested > 50


def test_countdown_process_verifier_after_a_corrupted_step():
    # Countdown's state is undefined after an invalid step: True before it, False from it on,
    # and the outcome is wrong.
    task, rng = get_task("countdown"), random.Random(4)
    for p in problems(task, n=20):
        steps = task.rationale(p)
        k = rng.randrange(len(steps))
        lhs, c = steps[k].split("=")
        bad = f"{lhs}={corrupt_digit(rng, c)}"
        text = task.completion(steps[:k] + [bad] + steps[k + 1:], p.answer)
        assert task.check_steps(p, text) == [True] * k + [False] * (len(steps) + 1 - k)
        assert not task.check(p, text)


def test_countdown_rationale_marks_exactly_the_step_the_process_verifier_rejects():
    # the learned recheck's rationale (task.recheck): each step recomputed from its operands. On
    # gold traces with one step's arithmetic broken, the steps whose recomputation differs from the
    # claim are exactly the one the process verifier rejects first; a gold trace has none.
    task, rng = get_task("countdown"), random.Random(6)
    for p in problems(task, n=40):
        steps = task.rationale(p)
        gold = task.gold_completion(p)
        assert [q + claim for q, claim, _ in task.recheck(gold)] == steps  # every step, in order
        assert all(claim == should for _, claim, should in task.recheck(gold))
        k = rng.randrange(len(steps))
        lhs, c = steps[k].split("=")
        bad = task.completion(steps[:k] + [f"{lhs}={corrupt_digit(rng, c)}"] + steps[k + 1:],
                              p.answer)
        marked = [claim != should for _, claim, should in task.recheck(bad)]
        assert marked == [j == k for j in range(len(steps))]
        assert task.check_steps(p, bad).index(False) == k
    # an operation the rules forbid recomputes to "x"; a prefix (no answer line yet) is checked
    # too; a line that is not a step leaves no rationale
    assert task.recheck("7-9=2\n5/2=2\n") == [("7-9=", "2", "x"), ("5/2=", "2", "x")]
    assert task.recheck("3*4=12\nA: 12") == [("3*4=", "12", "12")]
    assert task.recheck("3*4=12\nhello\nA: 12") is None and task.recheck("") is None
    assert get_task("expression").recheck("7*5-6\nA: 29") is None  # no rationale there


def test_countdown_dead_end_step_is_wrong_but_valid():
    # A valid step after which the target is unreachable is wrong; the step after it may be
    # valid too, and is also wrong (still unreachable).
    task = get_task("countdown")
    p = Problem("2 3 5 T: 25", "25", 3, ((2, 3, 5), 25))  # 5*(2+3)
    assert task.check_steps(p, "3+2=5\n5*5=25\nA: 25") == [True, True, True]
    assert not reachable((6, 5), 25)
    assert task.check_steps(p, "3*2=6\n6+5=11\nA: 11") == [False, False, False]


def test_countdown_rules():
    task = get_task("countdown")
    p = Problem("2 3 5 T: 15", "15", 3, ((2, 3, 5), 15))
    assert not task.check(p, "5*3=15\nA: 15")                   # 2 unused
    assert not task.check(p, "5*3=15\n3-2=1\n15*1=15\nA: 15")   # 3 used twice
    assert not task.check(p, "5*3=16\nA: 15")                   # wrong arithmetic
    assert not task.check(p, "2-3=0\n5*3=15\nA: 15")            # negative intermediate
    assert not task.check(p, "5/2=2\n3*2=6\nA: 15")             # inexact division
    assert apply_op(3, "-", 5) is None and apply_op(3, "/", 0) is None and apply_op(0, "/", 3) == 0
    assert task.check(p, "5-2=3\n3*3=9\nA: 15") is False         # valid steps, wrong target
    # Two equal operands need two copies.
    assert apply_step([3, 4, 5], "3+3=6") is None
    assert sorted(apply_step([3, 3, 4], "3+3=6")) == [4, 6]
    assert task.check(Problem("3 3 4 T: 10", "10", 3, ((3, 3, 4), 10)), "3+3=6\n6+4=10\nA: 10")


# ---------------------------------------------------------------- countdown solver

def brute_force_values(numbers):
    """Every value of every full expression tree over every ordering of the numbers, naively."""
    def trees(seq):
        if len(seq) == 1:
            return {seq[0]}
        out = set()
        for k in range(1, len(seq)):
            for x in trees(seq[:k]):
                for y in trees(seq[k:]):
                    out |= {x + y, x * y}
                    if x >= y:
                        out.add(x - y)
                    if y != 0 and x % y == 0:
                        out.add(x // y)
        return out
    return set().union(*(trees(perm) for perm in itertools.permutations(numbers)))


def test_countdown_solver_agrees_with_brute_force():
    rng, task = random.Random(5), get_task("countdown")
    for _ in range(300):
        pool = list(range(0, 13)) + [25, 50, 75, 100]  # 0 too, to exercise the rules
        numbers = [rng.choice(pool) for _ in range(rng.randint(2, 4))]
        values = brute_force_values(numbers)
        targets = rng.sample(sorted(values), min(4, len(values)))   # reachable
        targets += [rng.randint(0, 1200) for _ in range(6)]         # mostly not
        for t in targets:
            assert reachable(numbers, t) == (t in values), (numbers, t)
            steps = solve(numbers, t)
            assert (steps is not None) == (t in values)
            if steps is not None:
                p = Problem("", str(t), len(numbers), (tuple(numbers), t))
                assert task.check(p, task.completion(steps, t)), (numbers, t, steps)


def test_every_countdown_problem_is_solvable():
    task = get_task("countdown")
    for p in problems(task):
        numbers, target = p.data
        assert reachable(numbers, target) and 10 <= target <= 999
        assert p.question == " ".join(map(str, numbers)) + f" T: {target}"
        assert len(task.rationale(p)) == len(numbers) - 1


# ---------------------------------------------------------------- countdown's settings and files

def test_countdown_default_draw_is_pinned():
    # The default setting draws what it always drew (every result in the README rests on it).
    assert [p.question for p in sample_problems("countdown", 4, [2, 3, 4, 5], seed=0)] == \
        ["7 100 T: 700", "50 4 9 T: 86", "12 2 11 6 T: 184", "5 1 9 1 2 T: 47"]
    # ... and written out, the default setting draws the same
    default = Countdown(numbers="1-12+25,50,75,100", targets="10-999")
    assert sample_problems(default, 200, [2, 3, 4], seed=1) == \
        sample_problems("countdown", 200, [2, 3, 4], seed=1)


def test_countdown_setting_draws_inside_its_ranges():
    public = Countdown(numbers="1-100", targets="1-100")  # TinyZero's setting: no large ones
    ps = sample_problems(public, 400, [2, 3, 4, 5], seed=0)
    numbers = [x for p in ps for x in p.data[0]]
    assert min(numbers) == 1 and max(numbers) == 100  # the whole range, nothing outside it
    assert all(1 <= p.data[1] <= 100 and reachable(*p.data) for p in ps)
    assert all(public.could_draw(p) for p in ps)
    large = Countdown(numbers="1-5+50", targets="0-10000")
    ps = sample_problems(large, 400, [3], seed=0)
    assert all(x <= 5 or x == 50 for p in ps for x in p.data[0])
    assert all(p.data[0].count(50) <= 1 for p in ps)
    assert 0.15 < sum(50 in p.data[0] for p in ps) / len(ps) < 0.35  # 1 problem in 4
    drawn = lambda numbers, target: Countdown().could_draw(  # noqa: E731
        Problem("", str(target), len(numbers), (numbers, target)))
    assert drawn((12, 2, 100), 26) and not drawn((13, 2, 2), 26)  # 13: not in 1-12+large
    assert not drawn((25, 50, 2), 77) and not drawn((12, 2, 2), 9)  # two large; target < 10


@pytest.mark.parametrize("numbers,targets", [("1-x", "1-100"), ("0-5", "1-100"), ("5-1", "1-100"),
                                             ("1-9+", "1-100"), ("1-9", "100"), ("1-9", "9-1")])
def test_countdown_setting_refuses_what_is_not_one(numbers, targets):
    with pytest.raises(ValueError):
        Countdown(numbers=numbers, targets=targets)


def test_countdown_setting_that_cannot_be_drawn_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="900-999"):
        Countdown(numbers="1-2", targets="900-999").sample(random.Random(0), 2)


def test_read_problems_reads_both_public_formats(tmp_path):
    task = get_task("countdown")
    f = tmp_path / "test.jsonl"
    f.write_text('\ufeff{"nums": [30, 100, 93], "target": 23}\r\n'  # a byte-order mark, CRLF
                 '{"input": "4,7,2", "output": "30", "id": 7}\n'
                 '\n'
                 '{"input": "93 30 100", "output": 23}\n'
                 '{"numbers": ["3", "8"], "target": "24", "solution": ["3*8=24"]}\n')
    rows = read_problems(task, str(f))
    assert [n for n, _ in rows] == [1, 2, 4, 5]  # the blank line is skipped, not counted
    ps = [p for _, p in rows]
    assert ps[0].question == "30 100 93 T: 23" and ps[0].answer == "23" and ps[0].difficulty == 3
    assert ps[1].data == ((4, 7, 2), 30) and ps[3].data == ((3, 8), 24)
    assert task.key(ps[0]) == task.key(ps[2])  # the same numbers in another order
    for p in ps:
        assert task.check(p, task.gold_completion(p))


BAD_LINES = [  # (a line, words its error names besides the line number)
    ("not json", ["not JSON", '"nums"']),
    ("[30, 100, 93]", ["not a countdown problem"]),
    ('{"nums": [30, 100, 93]}', ["not a countdown problem"]),
    ('{"nums": [30, true, 93], "target": 23}', ["not a countdown problem"]),
    ('{"nums": [30, 1.5, 93], "target": 23}', ["not a countdown problem"]),
    ('{"nums": [30, -7, 93], "target": 23}', ["not a countdown problem"]),
    ('{"input": "30,x,93", "output": "23"}', ["not a countdown problem"]),
    ('{"input": "30,100,93", "output": "twenty"}', ["not a countdown problem"]),
    ('{"nums": [30, "\u00b2", 93], "target": 23}', ["not a countdown problem"]),  # a digit?
    ('{"nums": [30, 100, 93], "target": 10000000}', ["not a countdown problem"]),  # > 10**6
    ("[" * 100000, ["not JSON"]),  # nested deeper than the parser goes
    ('{"nums": [1, 2, 3, 4, 5, 6], "target": 3}', ["2 to 5 numbers, not 6"]),
    ('{"nums": [7], "target": 7}', ["2 to 5 numbers, not 1"]),
]


@pytest.mark.parametrize("line,words", BAD_LINES)
def test_read_problems_names_the_bad_line(line, words, tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text('{"nums": [30, 100, 93], "target": 23}\n\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        read_problems(get_task("countdown"), str(f))
    assert f"{f} line 3" in str(e.value) and "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ---------------------------------------------------------------- expression

def random_expression_string(rng, k):
    """A random expression with k operations, multi-digit numbers and random (also redundant)
    parentheses: test input for the parser, independent of the task's renderer."""
    if k == 0:
        return str(rng.choice([0, 1, 7, 12, 305]))
    left = rng.randint(0, k - 1)
    a, b = random_expression_string(rng, left), random_expression_string(rng, k - 1 - left)
    a, b = (f"({s})" if rng.random() < 0.4 else s for s in (a, b))
    return f"{a}{rng.choice('+-*')}{b}"


def test_expression_parser_agrees_with_python():
    rng = random.Random(6)
    for _ in range(2000):
        s = random_expression_string(rng, rng.randint(0, 8))
        t = E.parse(s)
        assert t is not None and E.evaluate(t) == eval(s), s  # eval: our own test strings
        assert eval(E.render(t)) == eval(s)  # minimal parentheses keep the value
    for bad in ["", "1+", "(1", "1)", "-1", "01", "1 +2", "1/2", "2**3", "()", "1(2)", "(((" * 100]:
        assert E.parse(bad) is None, bad


def test_expression_steps_remove_one_operator_each():
    task = get_task("expression")
    for p in problems(task):
        t = E.parse(p.question)
        assert t == p.data and E.render(t) == p.question  # the parsed tree is canonical
        lines = [p.question] + task.rationale(p)
        assert len(lines) == p.difficulty
        for i, line in enumerate(lines):
            t = E.parse(line)
            assert E.n_ops(t) == p.difficulty - i
            assert E.evaluate(t) == int(p.answer) == eval(line)
            # Never a unary minus (every subexpression is non-negative), never a space or "/".
            assert "(-" not in line and not line.startswith("-") and not set(line) & set("/ ")


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_every_task():
    enc = get_tokenizer()
    assert enc.n_vocab == 100 and encode("\n") == [NEWLINE] and encode(" ") == [1]
    assert encode("<|endoftext|><|startofthought|><|endofthought|><|pad|>") == [96, 97, 98, 99]
    for name in sorted(TASKS):
        task = get_task(name)
        for p in problems(task, n=3):
            body = task.prompt(p, hint=True) + task.gold_completion(p)
            assert len(encode(body)) == len(body)  # one token per character
            for text in (body + "<|endoftext|>",
                         task.prompt(p) + "<|startofthought|>" + task.gold_completion(p)
                         + "<|endofthought|><|endoftext|><|pad|><|pad|>"):
                ids = encode(text)
                assert all(0 <= i < 100 for i in ids)
                assert decode(ids) == text
            assert encode(body + "<|endoftext|>")[-1] == EOT
    assert decode([SOT, PAD]) == "<|startofthought|><|pad|>"


def test_tokenizer_rejects_unknown():
    for bad in ["é", "tab\there", "\r"]:
        with pytest.raises(ValueError, match="not in the tokenizer's alphabet"):
            encode(bad)
    with pytest.raises(ValueError):
        decode([100])
    with pytest.raises(ValueError, match="arith-char-v1"):
        get_tokenizer("gpt2")


# ---------------------------------------------------------------- sampling

def test_sample_problems():
    task = get_task("addition")
    a = sample_problems(task, 60, [1, 3, 5], seed=7)
    assert a == sample_problems("addition", 60, [1, 3, 5], seed=7)  # deterministic
    assert a != sample_problems(task, 60, [1, 3, 5], seed=8)
    assert [p.difficulty for p in a] == [1, 3, 5] * 20
    assert all(len(p.question.split("+")[0]) == p.difficulty for p in a)

    # 1-digit addition has 55 problems (keys: the unordered addends); exclude all but three:
    # what is left comes in either order
    everything = {(x, y) for x in range(10) for y in range(x, 10)}
    keep = {(1, 2), (3, 4), (9, 9)}
    got = sample_problems(task, 50, [1], 0, exclude=everything - keep)
    assert {p.question for p in got} == {"1+2", "2+1", "3+4", "4+3", "9+9"}
    with pytest.raises(ValueError, match="difficulty 1"):
        sample_problems(task, 1, [1], 0, exclude=everything)

    with pytest.raises(ValueError, match="13.*1..12"):
        sample_problems(task, 5, [2, 13], 0)
    with pytest.raises(ValueError, match="1.*2..5"):
        sample_problems("countdown", 5, [1], 0)


# ---------------------------------------------------------------- verifiers never raise

def fuzz_strings(rng, golds):
    alphabet = string.digits + "+-*/=():A T\n" + string.ascii_letters
    for _ in range(1500):
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    for _ in range(300):  # well-shaped lines with random content
        prefixes = ["A: ", "", "9*", "(", "1+2=", "T: "]
        yield "\n".join(rng.choice(prefixes) + str(rng.randint(0, 10 ** rng.randint(0, 40)))
                        for _ in range(rng.randint(1, 5)))
    for _ in range(1000):  # mutated gold completions: replace, insert or delete a character
        g = rng.choice(golds)
        i = rng.randrange(len(g) + 1)
        ch = rng.choice(alphabet)
        yield rng.choice([g[:i] + ch + g[i + 1:], g[:i] + ch + g[i:], g[:i] + g[i + 1:]])
    yield from ["", "\n", "\n\n\n", "A:", "A: ", "A: 0", "A: -5", "A: " + "9" * 5000, "9" * 5000,
                "1+" * 3000 + "1", "(" * 500 + "1" + ")" * 500, "é\x00\ufffd", "<|endoftext|>",
                "<|startofthought|>A: 1<|endofthought|>", "99999999999*99999999999=1\nA: 1"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_verifiers_never_raise(name):
    task, rng = get_task(name), random.Random(9)
    ps = problems(task, n=2)
    for text in fuzz_strings(rng, [task.gold_completion(p) for p in ps]):
        p = rng.choice(ps)
        ok, labels, ans = task.check(p, text), task.check_steps(p, text), task.extract_answer(text)
        assert isinstance(ok, bool) and isinstance(ans, (str, type(None)))
        assert len(labels) == text.rstrip("\n").count("\n") + 1
        assert all(isinstance(x, bool) for x in labels)
        if ok:  # the outcome verifier and the answer line's label agree
            assert labels[-1]
