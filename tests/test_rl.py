"""
Guards rl.py's policy gradient: the loss against a hand computation (its sign, the group
baseline, only the sampled tokens), a group whose rewards are all equal teaches nothing, the
log-probs are the sampler's distribution token by token, a tool's writes and a cut sample's
missing end get no gradient, the KL term, and a tiny run of both arms that resumes.

Run: python -m pytest tests/test_rl.py
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import rl
from model import GPT, GPTConfig, generate
from tasks import EOT, NOT_TEXT, PAD, encode, get_task


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=1, n_head=2, n_embd=16)).eval()


def test_advantage_is_the_reward_minus_its_groups_mean_and_zero_for_equal_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    adv = rl.advantages(rewards)
    assert adv[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert adv[1:].abs().sum() == 0  # all right or all wrong: no gradient at all
    assert rl.advantages(rewards, "none").tolist() == rewards.tolist()  # STaR's reading
    assert rl.advantages(rewards, negatives=False)[0].tolist() == [0.5, 0.0, 0.0, 0.5]


def test_policy_gradient_loss_by_hand_on_two_samples():
    # sample 0 right, sample 1 wrong: advantages +0.5 and -0.5; masked entries never count
    logp = torch.tensor([[-9.0, -1.0, -2.0], [-9.0, -3.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[False, True, True], [False, True, False]])
    adv = rl.advantages(torch.tensor([[1.0, 0.0]])).flatten()
    loss = rl.policy_gradient_loss(logp, mask, adv)
    assert math.isclose(loss.item(), -(0.5 * (-1 - 2) + -0.5 * (-3)) / 2)
    loss.backward()
    # descending the loss raises the right sample's log-probs and lowers the wrong one's
    assert logp.grad.tolist() == [[0.0, -0.25, -0.25], [0.0, 0.25, 0.0]]


def test_k3_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    zero = torch.zeros(1)
    assert rl.policy_gradient_loss(logp, mask, zero, logp.detach(), kl=1.0).item() == 0
    away = rl.policy_gradient_loss(logp, mask, zero, logp.detach() - 0.3, kl=0.5)
    assert math.isclose(away.item(), 0.5 * 2 * (math.exp(-0.3) + 0.3 - 1), rel_tol=1e-6)
    away.backward()  # d/dlogp of exp(r) - r - 1, r = ref - logp: 1 - exp(r), times kl / N
    assert torch.allclose(logp.grad, torch.full((1, 2), 0.5 * (1 - math.exp(-0.3))))


def test_token_logps_are_what_the_sampler_drew_with():
    # the sampler's own log-probs (temperature 1, its banned tokens) of what it wrote
    model = tiny_model(1)
    prompt = encode("Q: 12+3\n")
    tokens, logp_gen, lengths = generate(model, [prompt], 12, (EOT,), PAD, temperature=1.0,
                                         banned_tokens=NOT_TEXT, seeds=[3])
    n = int(lengths[0])
    comp = tokens[0, :n].tolist()
    logp, mask = rl.token_logps(model, [(prompt, comp)], [[True] * n], "cpu")
    assert torch.allclose(logp[0][mask[0]], logp_gen[0, :n].float(), atol=1e-5)


def test_token_logps_are_the_samplers_distribution_on_the_completion_only():
    model = tiny_model()
    prompt, comp = encode("12+3="), encode("15") + [EOT]
    logp, mask = rl.token_logps(model, [(prompt, comp)], [[True] * len(comp)], "cpu")
    seq = torch.tensor([prompt + comp])
    with torch.no_grad():
        logits = model(seq[:, :-1])[0].float()
    logits[:, list(NOT_TEXT)] = float("-inf")  # what the sampler never writes
    by_hand = [F.log_softmax(logits[len(prompt) - 1 + t], -1)[tok].item()
               for t, tok in enumerate(comp)]
    got = logp[0][mask[0]].tolist()
    assert mask[0].sum() == len(comp) and mask[0, :len(prompt) - 1].sum() == 0
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(got, by_hand))


def test_a_tools_writes_and_a_cut_samples_missing_end_get_no_gradient():
    task = get_task("countdown").with_calculator("result")
    p = task.problem((3, 5), 8)
    cap = rl.completion_cap(task, 2)
    at_cap, below = "1" * cap, "1" * (cap - 1)  # the sampler stopped the first, not the second
    examples, masks = rl.sampled_examples(task, [p], [["3+5=8\nA: 8", at_cap, below]])
    (_, ids), mask = examples[0], masks[0]
    assert ids[-1] == EOT and mask[-1]  # a finished sample: its end was sampled
    assert [i for i, m in enumerate(mask) if not m] == [4, 5]  # the calculator wrote "8\n"
    assert examples[1][1] == encode(at_cap) and len(masks[1]) == cap
    assert examples[2][1] == encode(below) + [EOT] and len(masks[2]) == cap


@pytest.mark.slow
def test_a_tiny_run_trains_both_arms_from_the_same_m0_and_resumes(tmp_path, monkeypatch):
    import train
    from common import read_jsonl
    small = ["--method", "rl", "--n-train", "8", "--n-unlabeled", "8", "--n-test", "6",
             "--steps", "4", "--rounds", "2", "--round-steps", "2", "--problems", "2",
             "--group", "2", "--train-difficulty", "1", "--test-difficulty", "1"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    train.main(small + ["--out", whole])
    rows = read_jsonl(os.path.join(whole, "metrics.jsonl"))
    assert [(r["arm"], r["round"]) for r in rows] == [("m0", 0), ("rl", 1), ("star", 1),
                                                      ("rl", 2), ("star", 2)]
    # each arm drew 2 problems x 2 samples on each of 2 steps, and took the steps it trained
    assert all(r["samples"] == 2 * 2 * 2 for r in rows[1:])
    assert all(r["train_steps"] == (2 if r["arm"] == "rl" or r["kept"] else 0) for r in rows[1:])
    assert os.path.exists(os.path.join(whole, "accuracy.png"))
    real_commit = rl.commit

    def crash_at_round_2(out, t0, row):
        if row["round"] == 2:
            raise KeyboardInterrupt  # killed after round 2's checkpoint, before its commit
        real_commit(out, t0, row)
    monkeypatch.setattr(rl, "commit", crash_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(small + ["--out", cut])
    monkeypatch.setattr(rl, "commit", real_commit)
    train.main(small + ["--out", cut])
    again = read_jsonl(os.path.join(cut, "metrics.jsonl"))
    assert [(r["arm"], r["round"], r["right"]) for r in again] == \
        [(r["arm"], r["round"], r["right"]) for r in rows]
    train.main(small + ["--out", whole])  # a finished run started again: the report alone
    assert read_jsonl(os.path.join(whole, "metrics.jsonl")) == rows


def test_one_step_raises_the_right_samples_log_prob_and_lowers_the_wrong_ones():
    model = tiny_model().train()
    prompt = encode("Q: 2+2\n")
    right, wrong = encode("4") + [EOT], encode("5") + [EOT]
    examples, masks = [(prompt, right), (prompt, wrong)], [[True, True]] * 2
    before = rl.token_logps(model, examples, masks, "cpu")[0].sum(1).tolist()
    opt = model.configure_optimizer(1e-3)
    logp, mask = rl.token_logps(model, examples, masks, "cpu")
    adv = rl.advantages(torch.tensor([[1.0, 0.0]])).flatten()  # +0.5, -0.5
    rl.policy_gradient_loss(logp, mask, adv).backward()
    opt.step()
    after = rl.token_logps(model, examples, masks, "cpu")[0].sum(1).tolist()
    assert after[0] > before[0] and after[1] < before[1]


def test_headline_compares_the_last_round_of_both_arms_and_m0():
    rows = [{"kind": "round", "arm": "m0", "round": 0, "right": [0, 0, 1, 0]},
            {"kind": "round", "arm": "rl", "round": 1, "right": [1, 1, 1, 1]},
            {"kind": "round", "arm": "star", "round": 1, "right": [0, 0, 0, 0]},
            {"kind": "round", "arm": "rl", "round": 2, "right": [1, 0, 1, 1]},
            {"kind": "round", "arm": "star", "round": 2, "right": [0, 1, 1, 0]}]
    got = {k: d for k, (d, _) in rl.headline_differences(rows).items()}
    assert got == {"rl - star, round 2": 0.25, "rl - m0, round 2": 0.5, "star - m0, round 2": 0.25}
    alone = {k for k in rl.headline_differences(rows[:2])}  # --no-star-arm: rl against M0 alone
    assert alone == {"rl - m0, round 1"}
