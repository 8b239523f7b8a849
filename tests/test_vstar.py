"""
Guards vstar.py: the DPO loss against its hand formula and one optimiser step's effect; the
best-of-k, pass@k and majority@k estimators against brute-force enumeration of every k-subset;
verifier scores that padding and batch-mates cannot change; the V-STaR run end to end.

Run: python -m pytest tests/test_vstar.py
"""

import math
import os
import random
from itertools import combinations

import pytest
import torch

import train
import vstar
from model import GPT, GPTConfig, ScalarHead, read_jsonl, sequence_logprobs

PAD = 99


def test_dpo_loss_equals_the_hand_formula():
    pc, pr = torch.tensor([-3.0, -10.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -9.0]), torch.tensor([-3.0, -2.5])
    beta = 0.5
    loss, r_c, r_r, acc = vstar.dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: 0.5 * ((-3 + 3.5) - (-4 + 3)) = 0.75; pair 1: 0.5 * ((-10 + 9) - (-2 + 2.5)) = -0.75
    hand = (-math.log(1 / (1 + math.exp(-0.75))) - math.log(1 / (1 + math.exp(0.75)))) / 2
    assert math.isclose(loss.item(), hand, rel_tol=1e-6)
    assert torch.allclose(r_c, torch.tensor([0.25, -0.5])) and acc.item() == 0.5


def test_one_dpo_step_raises_the_chosen_minus_rejected_log_ratio():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    ref = GPT(policy.config)
    ref.load_state_dict(policy.state_dict())
    prompt, chosen, rejected = [5, 6, 7], [10, 11, 12, 96], [13, 14, 96]

    def margin():
        with torch.no_grad():
            pi = sequence_logprobs(policy, [prompt, prompt], [chosen, rejected], PAD)
            rf = sequence_logprobs(ref, [prompt, prompt], [chosen, rejected], PAD)
        return ((pi[0] - rf[0]) - (pi[1] - rf[1])).item()

    assert abs(margin()) < 1e-6  # policy == reference at the start
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    pi = sequence_logprobs(policy, [prompt, prompt], [chosen, rejected], PAD)
    with torch.no_grad():
        rf = sequence_logprobs(ref, [prompt, prompt], [chosen, rejected], PAD)
    loss = vstar.dpo_loss(pi[:1], pi[1:], rf[:1], rf[1:], beta=0.1)[0]
    loss.backward()
    opt.step()
    assert margin() > 1e-4


def brute_best_of_k(scores, correct, k):
    """Every k-subset; the top score wins, ties among the top split the credit evenly."""
    total = 0.0
    subsets = list(combinations(range(len(scores)), k))
    for s in subsets:
        top = max(scores[i] for i in s)
        tied = [i for i in s if scores[i] == top]
        total += sum(correct[i] for i in tied) / len(tied)
    return total / len(subsets)


def brute_majority(answers, right, k):
    """Every k-subset; the most-voted answer wins, a tie of t answers credits 1/t each."""
    total = 0.0
    subsets = list(combinations(range(len(answers)), k))
    for s in subsets:
        votes = {}
        for i in s:
            if answers[i] is not None:
                votes[answers[i]] = votes.get(answers[i], 0) + 1
        if votes:
            top = max(votes.values())
            winners = [a for a, v in votes.items() if v == top]
            total += sum(w in right for w in winners) / len(winners)
    return total / len(subsets)


@pytest.mark.parametrize("seed", range(20))
def test_estimators_equal_brute_force_over_all_k_subsets(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    # few distinct scores, so ties are common
    scores = [rng.choice([0.1, 0.5, 0.9, 1.3]) for _ in range(n)]
    correct = [rng.random() < 0.4 for _ in range(n)]
    answers = [rng.choice(["7", "8", "9", None]) for _ in range(n)]
    for k in range(1, n + 1):
        assert math.isclose(vstar.best_of_k(scores, correct, k),
                            brute_best_of_k(scores, correct, k), abs_tol=1e-12)
        brute_pass = sum(any(correct[i] for i in s) for s in combinations(range(n), k)) / \
            math.comb(n, k)
        assert math.isclose(vstar.pass_at_k(n, sum(correct), k), brute_pass, abs_tol=1e-12)
        assert math.isclose(vstar.pass_at_k(n, sum(correct), k),
                            1 - math.comb(n - sum(correct), k) / math.comb(n, k))
        assert math.isclose(vstar.majority_at_k(answers, {"8"}, k),
                            brute_majority(answers, {"8"}, k), abs_tol=1e-12)
        # several right answers (countdown: every right trace is its own answer)
        assert math.isclose(vstar.majority_at_k(answers, {"8", "9"}, k),
                            brute_majority(answers, {"8", "9"}, k), abs_tol=1e-12)


def test_an_unparsable_answer_never_wins_the_vote():
    assert vstar.majority_at_k([None, None, None], {None}, 2) == 0.0
    assert vstar.majority_at_k([None, None, "3"], {"3"}, 3) == 1.0
    assert vstar.majority_at_k(["3", "4"], set(), 2) == 0.0  # no right answer in the pool


def test_verifier_scores_ignore_padding_and_batch_mates():
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    orm = ScalarHead(gpt)
    torch.nn.init.normal_(orm.head.weight)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    comps = [[20, 21, 96], [22, 96], [23, 24, 25, 26, 27, 96]]
    for kind, model in [("orm", orm), ("dpo", gpt), ("dpo-mean", gpt)]:
        together = vstar.scores(model, prompts, comps, kind)
        alone = [vstar.scores(model, [p], [c], kind)[0] for p, c in zip(prompts, comps)]
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
                   for a, b in zip(together, alone)), kind


@pytest.mark.slow
def test_vstar_runs_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--method", "vstar", "--out", out, "--n-train", "16", "--n-unlabeled", "8",
                "--n-test", "6", "--steps", "20", "--batch-size", "8", "--samples", "4",
                "--eval-samples", "4", "--verifier-steps", "3", "--iterations", "1",
                "--train-difficulty", "1-2", "--test-difficulty", "1-2", "--temperature", "1.5"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r.get("iteration") for r in rows] == [0, 1, None]
    ev = rows[-1]
    assert ev["k"] == [1, 2, 4]
    for key in ["pass@k", "majority@k", "best-of-k dpo", "best-of-k orm"]:
        assert len(ev[key]) == 3 and all(0 <= x <= 1 for x in ev[key])
    # pass@k is an upper bound of every selection rule
    for key in ["majority@k", "best-of-k dpo", "best-of-k dpo-mean", "best-of-k orm"]:
        assert all(x <= p + 1e-12 for x, p in zip(ev[key], ev["pass@k"])), key
    assert os.path.exists(os.path.join(out, "vstar.png"))
