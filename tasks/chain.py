"""
A chain of operations on one digit, left to right, keeping only the last digit (mod 10).

    Q: 8+8*8+5
    8+8=6          the running digit, one operation per line
    6*8=8
    8+5=3
    A: 3

The text Quiet-STaR reads by default: every answer is one digit, the digit needs a sequence of
lookups that a 4-layer model does badly in one forward pass, and each written step is one lookup
in a 10x9 table, which the same model learns quickly. So writing the steps out is worth much more
than answering directly: what a thought needs, to have something to say.

Difficulty = number of operations. Test: python -m pytest tests/test_tasks.py -k chain

Choices, on purpose:
1. No precedence: "8+8*8+5" means ((8+8)*8+5) mod 10. Each operation acts on the running digit.
2. Operands: "+" adds 1..9, "*" multiplies by 2..9 (+0 and *1 would be steps that do nothing).
3. The process verifier is Task's default, as addition's: step k must be gold step k character
   for character (the chain has one right scratchpad).
"""

from .base import Problem, Task


class Chain(Task):
    name = "chain"
    difficulties = tuple(range(1, 9))  # number of operations
    default_difficulties = {"cpu": ("1-4", "1-5"), "gpu": ("1-6", "1-8")}  # (train, test)

    def sample(self, rng, difficulty):
        self.validate(difficulty)
        start = rng.randint(0, 9)
        ops = []
        for _ in range(difficulty):
            op = rng.choice("+*")
            ops.append((op, rng.randint(1, 9) if op == "+" else rng.randint(2, 9)))
        question = str(start) + "".join(f"{op}{d}" for op, d in ops)
        data = (start, tuple(ops))
        return Problem(question=question, answer=self.running(data)[-1], difficulty=difficulty,
                       data=data)

    @staticmethod
    def running(data):
        """The running digit after each operation, as strings: ["6", "8", "3"]."""
        x, out = data[0], []
        for op, d in data[1]:
            x = (x + d) % 10 if op == "+" else (x * d) % 10
            out.append(str(x))
        return out

    def rationale(self, p):
        before = [str(p.data[0])] + self.running(p.data)
        return [f"{before[i]}{op}{d}={before[i + 1]}" for i, (op, d) in enumerate(p.data[1])]
