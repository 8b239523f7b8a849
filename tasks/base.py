"""
The interface every task family offers, and the parts they share.

A task samples problems at a difficulty, writes the gold step-by-step rationale, formats the
prompt and the completion, and checks a completion twice: the outcome verifier (is the final
answer right?) and the process verifier (which lines are right?). Both are exact because the
tasks are synthetic, and both take arbitrary text without raising: garbage is simply wrong.

Text format (DESIGN.md):
    prompt      "Q: 624+257\n"            (with a hint: "Q: 624+257\nH: 881\n")
    completion  "4+7+0=11 1 C1\n...\nA: 881"   one reasoning step per line, the last line
                "A: <answer>"; the model appends <|endoftext|>, which is stripped before checking.
The newline is the step boundary that beam search and MCTS expand on.

Test: python -m pytest tests/test_tasks.py

To add a task: subclass Task in a new file (name, difficulties, sample, rationale, and step_ok or
check_steps unless a step is right only when it equals the gold one) and add one line to the
registry in tasks/__init__.py.
"""

import random
import re
from dataclasses import dataclass

# A canonical non-negative integer: no leading zeros ("046" is not a number here), at most 30
# digits, so parsing a model's runaway digit string is never slow and never overflows anything.
NUMBER = r"(?:0|[1-9]\d{0,29})"
ANSWER_LINE = re.compile(rf"A: ({NUMBER})")


@dataclass(frozen=True)
class Problem:
    question: str     # what follows "Q: " in the prompt, e.g. "624+257"
    answer: str       # canonical final answer text, e.g. "881"
    difficulty: int   # task-specific: digits, operations, how many numbers
    data: tuple = ()  # task-specific payload (operands, numbers and target), hashable


def split_lines(text):
    """The lines of a completion; trailing newlines are not an extra (empty) step."""
    return text.rstrip("\n").split("\n")


def parse_answer_line(line):
    """The answer in a line that is exactly "A: <canonical number>", else None."""
    m = ANSWER_LINE.fullmatch(line)
    return m.group(1) if m else None


class Task:
    name = ""
    difficulties = ()  # every valid difficulty, e.g. tuple(range(1, 13))
    # (train, test) difficulties of the runs that leave them unset: the CPU presets (tiny,
    # small) and the gpu preset; None: every difficulty
    default_difficulties = {"cpu": None, "gpu": None}
    tool = None  # a program the sampler calls when the model writes tool.trigger (a calculator)
    calculators = ()  # the tools it has, by name (with_calculator)

    # ---- what each task writes ----

    def sample(self, rng: random.Random, difficulty: int) -> Problem:
        raise NotImplementedError

    def key(self, p):
        """What makes two problems the same problem (the test set holds none twice, and no
        training set holds one of them): the question by default; a task with symmetries says
        more (countdown: the numbers in any order)."""
        return p.question

    def rationale(self, p) -> list[str]:
        """The gold step lines, without the answer line."""
        raise NotImplementedError

    def step_ok(self, p, i, line) -> bool:
        """Is step line i (0-based) right? Used by the default check_steps. By default: it is
        gold step i (a task with one right scratchpad); lines past the last step are wrong."""
        gold = self.rationale(p)
        return i < len(gold) and line == gold[i]

    def recheck(self, text) -> list[tuple[str, str, str]] | None:
        """The learned recheck's verification rationale, written by the task: for every step line
        of a completion or of a prefix of one, (the step with its result cut off, the result it
        claims, the result it should have), each checkable alone: ("48+11=", "300", "59"). A
        step is judged wrong exactly where the two results differ. None where a line (but a
        last answer line) is not a step, and for a task without such a check (the default)."""
        return None

    def rules_ok(self, p, text, finished=True) -> bool:
        """What the learned recheck does not learn, judged by rule: can the rationale of recheck
        cover this text (a finished solution, or a prefix of one when finished is False)? The task's
        bookkeeping: in countdown, operands still available and the target reached."""
        return True

    # ---- shared: formatting ----

    def with_calculator(self, mode):
        """This task with its sampler calling the calculator `mode` (one of self.calculators),
        or with none ("off")."""
        if mode != "off":
            raise ValueError(f"{self.name} has no calculator {mode!r}; choose off")
        return self

    def validate(self, difficulty):
        if difficulty not in self.difficulties:
            lo, hi = min(self.difficulties), max(self.difficulties)
            raise ValueError(f"difficulty {difficulty!r} is not valid for task {self.name!r}; "
                             f"valid: {lo}..{hi}")

    def hint(self, p) -> str:
        """What STaR's rationalization shows after "H: "; the answer by default."""
        return p.answer

    def prompt(self, p, hint=False) -> str:
        if hint:
            return f"Q: {p.question}\nH: {self.hint(p)}\n"
        return f"Q: {p.question}\n"

    def completion(self, steps, answer) -> str:
        # No trailing newline: the model ends the answer line with <|endoftext|> directly.
        return "\n".join(list(steps) + [f"A: {answer}"])

    def gold_completion(self, p) -> str:
        return self.completion(self.rationale(p), p.answer)

    # ---- shared: verifiers ----

    def extract_answer(self, text) -> str | None:
        """The canonical answer (what majority vote counts), or None if the last line is not
        an answer line."""
        return parse_answer_line(split_lines(text)[-1])

    def check(self, p, text) -> bool:
        """Outcome verifier: the last line is "A: <the right answer>". The steps are not read."""
        return self.extract_answer(text) == p.answer

    def check_steps(self, p, text) -> list[bool]:
        """Process verifier: one label per line, the answer line included.

        A line starting with "A:" is right iff it is the last line and the outcome is right; any
        other line is a step, judged by step_ok. So a partial trace (no answer line yet, as in
        beam search and MCTS) gets a label for each of its steps too.
        """
        lines = split_lines(text)
        last = len(lines) - 1
        return [(k == last and self.check(p, text)) if line.startswith("A:")
                else self.step_ok(p, k, line)
                for k, line in enumerate(lines)]
