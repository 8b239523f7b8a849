"""
Checks for the classroom exercises in the README ("Classroom exercises"). Each fails until the
exercise is done, so all are skipped by default; a student checks their work with

    python -m pytest tests/test_exercises.py --exercises

and a teacher can hand out the repository with these checks as the marking scheme.
"""

import random

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, generate
from tasks import PAD, TASKS, sample_problems


def random_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=100, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.double().eval()


@pytest.mark.exercise(3)
def test_exercise_3_top_p_samples_only_from_the_nucleus():
    model = random_model()
    prompts = [[5, 6, 7], [40, 41]]
    seeds = [1, 2]
    tokens, _, _ = generate(model, prompts, 20, (), PAD, temperature=1.0, top_p=0.6, seeds=seeds)
    for prompt, row in zip(prompts, tokens.tolist()):
        seq = torch.tensor([prompt + row])
        probs = F.softmax(model(seq)[0, len(prompt) - 1:-1].double(), dim=-1)  # (20, V)
        for t, tok in enumerate(row):
            p, order = probs[t].sort(descending=True)
            # the nucleus: the most likely tokens up to and including the one crossing 0.6
            size = int((p.cumsum(0) < 0.6).sum()) + 1
            assert tok in order[:size].tolist(), f"step {t}: token {tok} is outside the nucleus"
    # top_p = 1 keeps every token: the same samples as no top_p with the same seeds
    full = generate(model, prompts, 20, (), PAD, temperature=1.0, top_p=1.0, seeds=seeds)[0]
    plain = generate(model, prompts, 20, (), PAD, temperature=1.0, seeds=seeds)[0]
    assert torch.equal(full, plain)


@pytest.mark.exercise(4)
def test_exercise_4_multiplication_task():
    assert "multiplication" in TASKS, "register the task in tasks/__init__.py"
    task = TASKS["multiplication"]
    for d in task.difficulties[:4]:
        for p in sample_problems(task, 20, [d], seed=d):
            a, b = p.data
            assert p.answer == str(a * b)
            gold = task.gold_completion(p)
            assert task.check(p, gold) and all(task.check_steps(p, gold))
            assert len(task.rationale(p)) >= 1, "show the work: at least one step line"
            wrong = gold.rsplit("A: ", 1)[0] + f"A: {a * b + 1}"
            assert not task.check(p, wrong)
    junk = "".join(random.Random(0).choice("0123456789+*=AQ: \n") for _ in range(200))
    p = sample_problems(task, 1, [task.difficulties[0]], seed=0)[0]
    assert task.check(p, junk) is False and task.check(p, "") is False


@pytest.mark.exercise(10)
def test_exercise_10_leave_one_out_baseline():
    import argparse

    import quiet_star
    import train
    assert any(row[0] == "baseline" for row in quiet_star.FLAGS), \
        "add --baseline to quiet_star.FLAGS"
    parser = train.get_parser("quiet_star")
    args = parser.parse_args(["--method", "quiet_star"])
    train.resolve(args, parser)
    assert args.baseline == "mean", "keep mean as the default"
    torch.manual_seed(0)
    model = random_model().float()
    head = quiet_star.MixingHead(model.config.n_embd)
    with torch.no_grad():
        head.mlp[-1].weight.normal_(0, 0.1)  # a thought that changes the prediction
    seqs = torch.randint(0, 90, (2, 13))
    at = torch.arange(12)
    for n in (2, 3):
        out = quiet_star.think(model, head, seqs, at, thought_len=3, n_true=2, n_thoughts=n,
                               temperature=1.0, generator=torch.Generator().manual_seed(n))
        args = argparse.Namespace(base_weight=0.5, mixed_weight=0.5, reinforce_weight=1.0)
        mean = quiet_star.quiet_star_loss(out, seqs, n, argparse.Namespace(**vars(args),
                                          baseline="mean"))[1]["reward"]
        loo = quiet_star.quiet_star_loss(out, seqs, n, argparse.Namespace(**vars(args),
                                         baseline="loo"))[1]["reward"]
        assert mean > 0
        assert loo == pytest.approx(mean * n / (n - 1), rel=1e-5)
