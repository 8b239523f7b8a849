"""
Guards quiet_star.py: thoughts generated for every position in parallel equal thoughts generated
one position at a time (token for token, log-probs within 1e-5); the thought mask entry by
entry; the zero-initialised mixing head leaves the base model's predictions unchanged; the
REINFORCE term sends no gradient to forced tokens; the reward against a hand computation;
generation never emits meta-tokens; a run resumed after an interruption equals an uninterrupted
one; the mixing weight stays in its bounds; a meta-token row moves at most its cap per step;
only the answer digits of lines that do not show their work are measured.

Run: python -m pytest tests/test_quiet_star.py
"""

import argparse
import json
import os

import pytest
import torch

import quiet_star as qs
import train
from common import read_jsonl
from model import GPT, GPTConfig
from tasks import EOT, EOTH, NEWLINE, PAD, SOT, encode, get_task, sample_problems


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def random_head(n_embd, seed=1):
    """A mixing head whose last layer is NOT zero, so the thought really changes predictions."""
    torch.manual_seed(seed)
    head = qs.MixingHead(n_embd)
    for p in head.mlp[-1].parameters():
        torch.nn.init.normal_(p, std=0.5)
    return head


def arithmetic_rows(n=4, T=16):
    """Chain lines, every other one showing its work: "3+4=7", "3+4*2=(7,4)4"."""
    problems = sample_problems(get_task("chain"), 3 * n, [1, 2], seed=0)
    seqs, ans = qs.pack(get_task("chain"), problems, [i % 2 == 1 for i in range(3 * n)], T)
    return seqs[:n], ans[:n]


def loss_args(**kw):
    return argparse.Namespace(**{"base_weight": 0.5, "mixed_weight": 0.5,
                                 "reinforce_weight": 1.0, **kw})


@pytest.mark.parametrize("stride", [1, 3])
def test_parallel_thoughts_equal_one_position_at_a_time(stride):
    model, head = tiny_model(), random_head(32)
    seqs, _ = arithmetic_rows()
    T, L, n_true = seqs.size(1) - 1, 3, 2
    at = torch.arange(0, T, stride)
    with torch.no_grad():
        out = qs.think(model, head, seqs, at, L, n_true, temperature=0.0)
    checked = 0
    for b in range(seqs.size(0)):
        for i, t in enumerate(at.tolist()):
            future = seqs[b, t + 1:min(t + n_true, T)].tolist()  # what think() teacher-forces
            thought, logp, mixed, w = qs.think_naive(model, head, seqs[b, :t + 1].tolist(), L,
                                                     future)
            assert thought == out["thoughts"][b, i].tolist(), (b, t)
            assert torch.allclose(torch.tensor(logp), out["thought_logp"][b, i], atol=1e-5)
            valid = len(future) + 1  # talk tokens whose base position exists (t + j < T)
            assert torch.allclose(mixed, out["mixed_logits"][b, i, :valid], atol=1e-5)
            assert torch.allclose(w, out["w"][b, i, :valid], atol=1e-5)
            checked += 1
    assert checked == seqs.size(0) * len(at)
    # the meta-tokens are never sampled inside a thought
    assert not torch.isin(out["thoughts"], torch.tensor([SOT, EOTH, PAD])).any()


def test_thought_mask_entry_by_entry():
    # 5 real tokens, thoughts at positions 1 and 3, pass 2: columns 0-4 real, 5-6 pass 1, 7-8 pass 2
    m = qs.thought_mask(5, torch.tensor([1, 3]), 2)
    assert m.shape == (1, 1, 2, 9)
    expected = [
        # real 0..4             pass 1       pass 2
        [1, 1, 0, 0, 0,         1, 0,        1, 0],   # thought at position 1: x0 x1, its own
        [1, 1, 1, 1, 0,         0, 1,        0, 1],   # thought at position 3: x0..x3, its own
    ]
    assert m[0, 0].int().tolist() == expected


def test_thought_mask_every_position():
    T, k = 4, 3
    m = qs.thought_mask(T, torch.arange(T), k)[0, 0]  # (T, T + T*k)
    for i in range(T):
        for c in range(T + T * k):
            if c < T:
                want = c <= i  # the real prefix up to and including the thought's position
            else:
                want = (c - T) % T == i  # its own earlier thought tokens, one per pass
            assert bool(m[i, c]) == want, (i, c)


def test_zero_mixing_head_gives_the_base_models_predictions():
    model = tiny_model()
    head = qs.MixingHead(32)  # as initialised: last layer zero, so w = tanh(0) = 0
    qs.init_meta_tokens(model, "paren")
    seqs, _ = arithmetic_rows()
    T, n_true = seqs.size(1) - 1, 3
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = qs.think(model, head, seqs, torch.arange(T), 4, n_true, n_thoughts=2,
                       temperature=1.0, generator=gen)  # sampled thoughts: they must not matter
        base = model(seqs[:, :T]).repeat_interleave(2, 0)  # (B*2, T, V)
    assert (out["w"] == 0).all()
    for j in range(n_true):
        t = torch.arange(T - j)  # talk token j at position t predicts what base does at t + j
        assert torch.allclose(out["mixed_logits"][:, t, j], base[:, t + j], atol=1e-5)
    # and the meta-tokens start as the embeddings of "(" and ")", or (the default) both of "-"
    wte = model.transformer.wte.weight
    assert torch.equal(wte[SOT], wte[encode("(")[0]])
    assert torch.equal(wte[EOTH], wte[encode(")")[0]])
    qs.init_meta_tokens(model)
    assert torch.equal(wte[SOT], wte[encode("-")[0]]) and torch.equal(wte[EOTH], wte[SOT])


def test_reinforce_gradient_does_not_reach_forced_tokens():
    model, head = tiny_model(), random_head(32)
    seqs, _ = arithmetic_rows()
    T, L, n_true = seqs.size(1) - 1, 3, 2
    out = qs.think(model, head, seqs, torch.arange(T), L, n_true, n_thoughts=2,
                   temperature=1.0, generator=torch.Generator().manual_seed(0))
    for x in [out["base_logits"], out["mixed_logits"]] + out["pass_logits"]:
        x.retain_grad()
    loss, _ = qs.quiet_star_loss(out, seqs, 2, loss_args(base_weight=0.0, mixed_weight=0.0))
    loss.backward()

    def zero(x):
        return x.grad is None or (x.grad == 0).all()
    # passes 1..L predict sampled thought tokens: the policy gradient is there
    for k in range(1, L + 1):
        assert not zero(out["pass_logits"][k - 1]), k
    # the pass that predicts the forced end-of-thought, and the teacher-forced talk tokens: none
    for k in range(L + 1, L + n_true + 2):
        assert zero(out["pass_logits"][k - 1]), k
    assert zero(out["mixed_logits"])  # the reward is a constant: no gradient through it
    assert zero(out["base_logits"])


def test_reward_is_centred_per_position_and_clamped():
    # one row, two thoughts, one position, n_true = 2, vocabulary of 3; thought of 1 token
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]))
    mixed = torch.stack([logits, logits[[1, 0]]])[:, None]  # (2 thoughts, P=1, n_true=2, 3)
    mixed = torch.nn.functional.pad(mixed, (0, 97), value=float("-inf"))  # the other tokens: p 0
    out = {"base_logits": torch.zeros(1, 2, 100),
           "talk_targets": torch.tensor([[[0, 1]]]),  # (B=1, P=1, n_true=2)
           "mixed_logits": mixed,
           "thought_logp": torch.tensor([[[-1.0]], [[-2.0]]])}  # (2, 1, 1)
    seqs = torch.tensor([[0, 0, 1]])
    loss, stats = qs.quiet_star_loss(out, seqs, 2, loss_args(base_weight=0.0, mixed_weight=0.0))
    import math
    r1 = math.log(0.5) + math.log(0.5)   # thought 1 predicts both targets with p = 0.5
    r2 = math.log(0.25) + math.log(0.25)  # thought 2 with p = 0.25
    adv1, adv2 = max(0.0, r1 - (r1 + r2) / 2), max(0.0, r2 - (r1 + r2) / 2)
    assert adv2 == 0.0 and adv1 > 0  # the worse thought is clamped, not pushed down
    hand = -(adv1 * -1.0 + adv2 * -2.0) / 2
    assert abs(loss.item() - hand) < 1e-6


def test_thoughts_never_contain_meta_tokens_even_when_favoured():
    model, head = tiny_model(), random_head(32)
    with torch.no_grad():  # make the meta-tokens the model's favourite tokens
        model.transformer.wte.weight[[SOT, EOTH]] *= 200
    seqs, _ = arithmetic_rows()
    favourite = model(seqs[:, :-1]).argmax(-1)
    assert torch.isin(favourite, torch.tensor([SOT, EOTH])).any()  # the ban has work to do
    for temperature in (0.0, 1.0):
        with torch.no_grad():
            th = qs.think(model, head, seqs, torch.arange(seqs.size(1) - 1), 3, 1,
                          temperature=temperature, generator=torch.Generator().manual_seed(0))
        assert not torch.isin(th["thoughts"], torch.tensor(qs.NOT_THOUGHT)).any()


def decode_with_thoughts(model, head, prompt, max_new_tokens, thought_len):
    """Greedy decoding, a thought before every new token, one token at a time (think_naive)."""
    idx = list(prompt)
    for _ in range(max_new_tokens):
        _, _, logits, _ = qs.think_naive(model, head, idx, thought_len)
        logits = logits[-1].clone()
        logits[list(qs.NOT_THOUGHT)] = float("-inf")
        idx.append(int(logits.argmax()))
        if idx[-1] == NEWLINE:
            break
    return idx[len(prompt):]


def test_greedy_accuracy_equals_token_by_token_generation():
    """evaluate() reads accuracy from teacher-forced argmaxes; this decodes for real."""
    model, head = tiny_model(), random_head(32)
    task = get_task("addition")
    problems = sample_problems(task, 6, [1], seed=3)
    args = argparse.Namespace(thought_len=2)
    res = qs.evaluate_answers(model, head, qs.pack(task, problems, [False] * 6, 7),
                              args)  # a line per row
    right = 0
    for p in problems:
        toks = decode_with_thoughts(model, head, encode(p.question + "="), len(p.answer), 2)
        right += toks == encode(p.answer)
    assert res["accuracy"] == right / len(problems)
    assert EOT in qs.NOT_THOUGHT  # the text never ends inside a line


SMALL = ["--method", "quiet_star", "--base-steps", "3", "--think-steps", "4", "--eval-every", "2",
         "--n-test", "6", "--seq-len", "24", "--thought-len", "2", "--batch-size", "2",
         "--train-difficulty", "1", "--test-difficulty", "1"]


@pytest.mark.slow
def test_run_resumes_after_an_interruption(tmp_path, monkeypatch):
    small = SMALL
    whole = str(tmp_path / "whole")
    train.main(small + ["--out", whole])
    rows = read_jsonl(os.path.join(whole, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[-1]["quiet"]["line_nll"] != rows[-1]["no_reinforce"]["line_nll"]  # REINFORCE acts
    assert os.path.exists(os.path.join(whole, "accuracy.png"))
    assert "thought" in open(os.path.join(whole, "samples_step4.txt")).read()

    cut = str(tmp_path / "cut")
    real_commit = qs.commit

    def crash_at_step_4(out, t0, row):
        if row.get("step") == 4:
            raise KeyboardInterrupt  # killed after step 4's checkpoints, before its commit
        real_commit(out, t0, row)
    monkeypatch.setattr(qs, "commit", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(small + ["--out", cut])
    assert os.path.exists(os.path.join(cut, "quiet_step4.pt"))  # written, but not committed
    monkeypatch.setattr(qs, "commit", real_commit)
    train.main(small + ["--out", cut])
    resumed = read_jsonl(os.path.join(cut, "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [0, 2, 4]
    for a, b in zip(rows, resumed):
        arms = ("plain", "quiet", "no_reinforce", "plain_w1")
        for arm in arms if a["kind"] == "eval" else ("plain", "w=0", "w=1"):
            assert abs(a[arm]["answer_nll"] - b[arm]["answer_nll"]) < 1e-5, (a["step"], arm)
    assert json.load(open(os.path.join(cut, "config.json")))["thought_len"] == 2


@pytest.mark.slow
def test_the_arm_without_reinforce_is_the_thinking_arm_when_its_weight_is_0(tmp_path):
    # the control arm starts from the same model and head and draws the same thoughts on the same
    # batches: at REINFORCE's weight 0 for both, every measure is the same, to the last bit
    out = str(tmp_path / "run")
    train.main(SMALL + ["--out", out, "--reinforce-weight", "0", "--thought-len", "3"])
    last = read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]
    assert last["quiet"] == last["no_reinforce"]
    assert last["vs_no_reinforce"]["acc"] == 0
    assert last["quiet"]["line_nll"] != last["plain"]["line_nll"]  # the arms did train apart


def test_meta_tokens_move_meta_lr_mult_times_as_far():
    seqs, _ = arithmetic_rows()
    moves = {}
    for mult in (1.0, 100.0):
        model, head = tiny_model(), random_head(32)  # w != 0: the rows get real gradients
        qs.init_meta_tokens(model)
        opt = model.configure_optimizer(1e-3)
        opt.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
        wte = model.transformer.wte.weight
        before = wte[[SOT, EOTH]].detach().clone()
        other = wte[5].detach().clone()
        args = loss_args(seed=0, seq_len=seqs.size(1) - 1, think_stride=1, thought_len=2,
                         n_true=2, n_thoughts=2, thought_temperature=1.0, meta_lr_mult=mult,
                         meta_max_change=float("inf"))  # unbounded: the official code
        qs.quiet_star_step(model, head, opt, seqs, 1e-3, 0, args)
        moves[mult] = (wte[[SOT, EOTH]].detach() - before, wte[5].detach() - other)
    assert moves[1.0][0].abs().sum() > 0
    assert torch.allclose(moves[100.0][0], 100 * moves[1.0][0], rtol=1e-4, atol=1e-7)
    assert torch.allclose(moves[100.0][1], moves[1.0][1])  # an ordinary token: unchanged


def test_mixing_weight_stays_in_its_bounds():
    h = 10 * torch.randn(2, 50, 32), 10 * torch.randn(2, 50, 32)
    for bound, lo, hi in (("tanh", -1, 1), ("sigmoid", 0, 1)):
        head = random_head(32)  # last layer far from zero: w would be anywhere without a bound
        head.bound = bound
        mixed, w = head(*h)
        assert ((w > lo) & (w < hi)).all(), bound
        assert w.min() < lo + 0.01 and w.max() > hi - 0.01, bound  # the bound has work to do
        assert torch.allclose(mixed, (1 - w[..., None]) * h[0] + w[..., None] * h[1])
    head.bound = "linear"  # the official code's head: the same network, unbounded
    assert ((head(*h)[1] < -1) | (head(*h)[1] > 1)).any()
    assert (qs.MixingHead(32)(*h)[1] == 0).all()  # tanh starts at exactly 0
    assert torch.allclose(qs.MixingHead(32, "sigmoid")(*h)[1], torch.tensor(0.01))
    with pytest.raises(ValueError, match="choose tanh, linear or sigmoid"):
        qs.MixingHead(32, "relu")


def test_meta_token_change_per_step_is_bounded():
    seqs, _ = arithmetic_rows()
    model, head = tiny_model(), random_head(32)  # w != 0: the thoughts, and so the rows, matter
    qs.init_meta_tokens(model)
    opt = model.configure_optimizer(1e-3)
    opt.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
    wte = model.transformer.wte.weight
    args = loss_args(seed=0, seq_len=seqs.size(1) - 1, think_stride=1, thought_len=2, n_true=2,
                     n_thoughts=2, thought_temperature=1.0, meta_lr_mult=100.0,
                     meta_max_change=0.01)
    for step in range(3):
        before = wte[[SOT, EOTH]].detach().clone()
        cap = 0.01 * wte.detach().norm(dim=1).median()
        qs.quiet_star_step(model, head, opt, seqs, 1e-3, step, args)
        moved = (wte[[SOT, EOTH]].detach() - before).norm(dim=1)
        assert (moved > 0).all() and (moved <= cap * (1 + 1e-5)).all(), (moved, cap)
        assert torch.allclose(moved, cap, rtol=1e-4)  # x100 of Adam's step is always above it


def test_only_bare_lines_answers_are_measured():
    task = get_task("chain")
    p = sample_problems(task, 2, [3], seed=0)
    assert qs.line(task, p[0], worked=True) == (
        f"{p[0].question}:({','.join(task.running(p[0].data))}){p[0].answer}\n")
    seqs, ans = qs.pack(task, p, [True, False], 40)
    text = qs.line(task, p[0], True) + qs.line(task, p[1], False)
    assert seqs[0, :len(text)].tolist() == encode(text)
    hard = (ans[0] >= 0).nonzero().flatten().tolist()
    start = len(qs.line(task, p[0], True)) + len(p[1].question) + 1
    assert hard == list(range(start, start + len(p[1].answer)))  # the digits, not the newline
    assert (ans[0, hard] == 1).all()
