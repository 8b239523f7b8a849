"""
Guards score.py: SCoRe's shaped reward on the four cases, the KL on the first attempt's tokens
alone in stage I (and each attempt's own advantage in stage II), the two-attempt format, the
paper's metrics, what each SFT baseline keeps, M0's data and a tiny run that resumes.

Run: python -m pytest tests/test_score.py
"""

import os
from types import SimpleNamespace

import pytest
import torch

import score
from tasks import get_task
from tasks.countdown import solutions, solve

TASK = get_task("countdown").with_calculator("result")


def test_shaped_reward_on_the_four_cases():
    r1 = torch.tensor([0.0, 1.0, 0.0, 1.0])  # wrong->right, right->right, wrong->wrong,
    r2 = torch.tensor([1.0, 1.0, 0.0, 0.0])  # right->wrong
    assert score.shaped_reward(r1, r2, 10.0).tolist() == [11.0, 1.0, 0.0, -10.0]
    assert score.shaped_reward(r1, r2, 0.0).tolist() == r2.tolist()  # alpha 0: the plain reward


def grads(stage, r1, r2, ref_shift=0.5):
    """Gradients of score_loss with respect to y1's and y2's token log-probs (2 chains of one
    problem, 2 tokens each), the reference ref_shift away from the policy on every token."""
    args = SimpleNamespace(alpha=10.0, beta1=0.01, beta2=0.1)
    lp1 = torch.full((2, 2), -1.0, requires_grad=True)
    lp2 = torch.full((2, 2), -1.0, requires_grad=True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    first, second = (lp1, mask, lp1.detach() - ref_shift), (lp2, mask, lp2.detach() - ref_shift)
    score.score_loss(stage, torch.tensor([r1]), torch.tensor([r2]), first, second,
                     args).backward()
    return lp1.grad, lp2.grad


def test_stage_one_holds_the_first_attempt_by_kl_alone_and_trains_the_second_by_reward():
    # equal second rewards: no advantage, so the second attempt gets nothing, not even the KL
    g1, g2 = grads(1, [0.0, 1.0], [1.0, 1.0])
    assert g2.abs().sum() == 0 and (g1 > 0).all()  # KL alone pulls y1 toward M0 (its ref)
    # at the reference, y1 gets nothing whatever its reward; y2 gets the reward's advantage
    g1, g2 = grads(1, [0.0, 1.0], [1.0, 0.0], ref_shift=0.0)
    assert g1.abs().sum() == 0
    assert (g2[0] < 0).all() and (g2[1] > 0).all()  # descending raises the right y2


def test_stage_two_gives_each_attempt_its_own_advantage_and_the_kl_on_both():
    # y1 wrong then right in chain 0; right then right in chain 1: chain 0's y2 earns the bonus
    g1, g2 = grads(2, [0.0, 1.0], [1.0, 1.0], ref_shift=0.0)
    assert (g1[0] > 0).all() and (g1[1] < 0).all()  # y1: r1's advantage (0 vs 1)
    assert (g2[0] < 0).all() and (g2[1] > 0).all()  # y2: shaped 11 vs 1
    assert torch.allclose(g2[0], -g2[1]) and g2[0, 0] == -(11 - 6) / 2
    _, g2 = grads(2, [0.0, 0.0], [0.0, 0.0])  # no reward anywhere: the KL alone, on y2 too
    assert (g2 > 0).all()


def test_the_second_attempt_reads_the_first_and_the_instruction_and_is_checked_alike():
    p = TASK.problem((7, 3, 5), 26)
    y1, y2 = "7*3=21\n21+5=26\nA: 26", "7+5=12\n12*3=36\nA: 26"
    q = score.second_problem(p, y1)
    assert TASK.prompt(q) == TASK.prompt(p) + y1 + "\n" + score.INSTRUCTION + "\n"
    assert TASK.check(q, y1) and TASK.check(p, y1) and not TASK.check(q, y2)
    assert TASK.key(q) == TASK.key(p)  # the same problem, for held-out sets


def test_edit_distance():
    assert score.edit_distance("kitten", "sitting") == 3
    assert score.edit_distance("", "abc") == score.edit_distance("abc", "") == 3
    assert score.edit_distance("same", "same") == 0
    assert score.edit_distance("ab", "ba") == score.edit_distance("ba", "ab") == 2


def test_attempt_metrics_count_the_changes_and_the_delta_is_their_difference():
    p = TASK.problem((7, 3, 5), 26)
    right, wrong = "7*3=21\n21+5=26\nA: 26", "7+3=10\n10+5=15\nA: 26"
    m = score.attempt_metrics(TASK, [p] * 4, [wrong, right, wrong, right],
                              [right, right, wrong, wrong])
    assert (m["acc_t1"], m["acc_t2"]) == (0.5, 0.5)
    assert (m["wrong_to_right"], m["right_to_wrong"], m["delta"]) == (0.25, 0.25, 0.0)
    assert m["unchanged"] == 0.5 and m["right_t1"] == [0, 1, 0, 1]
    assert (m["copies_right"], m["copies_wrong"]) == (0.5, 0.5)  # right->right, wrong->wrong
    assert m["edit_distance"] == 2 * score.edit_distance(right, wrong) / 4
    m = score.attempt_metrics(TASK, [p] * 3, [right, wrong, wrong], [right, wrong, right])
    assert (m["copies_right"], m["copies_wrong"]) == (1.0, 0.5)


def test_sft_data_keeps_what_each_baseline_keeps():
    p = TASK.problem((7, 3, 5), 26)
    right, other, wrong = "7*3=21\n21+5=26\nA: 26", "7*5=35\n35-3=32\nA: 26", "7+3=10\nA: 26"
    assert TASK.check(p, right) and not TASK.check(p, other)
    y1 = [[wrong, right, other, wrong]]
    y2 = [[right, right, other, wrong]]  # wrong->right, right->right, wrong->wrong twice
    data = score.sft_data(TASK, [p], y1, y2, seed=0)
    second = lambda a, b: score.make_example(TASK, score.second_problem(p, a), b)  # noqa: E731
    assert data["star_wr"] == [second(wrong, right)]
    assert data["star"] == [second(wrong, right), second(right, right)]
    # every wrong first attempt, paired with a right one of the same problem
    assert data["pair_sft"] == [second(wrong, right), second(other, right), second(wrong, right)]
    assert score.sft_data(TASK, [p], [[wrong]], [[other]], 0)["pair_sft"] == []  # none right


def test_solutions_are_every_distinct_path_and_solve_is_the_first():
    for numbers, target in [((7, 3, 5), 26), ((3, 3, 6), 12), ((2, 4), 8), ((5, 12, 75, 2), 84)]:
        sols = list(solutions(numbers, target))
        p = TASK.problem(numbers, target)
        assert sols and sols[0] == solve(numbers, target)
        assert len({tuple(s) for s in sols}) == len(sols)
        assert all(TASK.check(p, TASK.completion(s, target)) for s in sols)
    assert list(solutions((2, 4), 7)) == [] and solve((2, 4), 7) is None
    assert sorted(map(tuple, solutions((2, 4), 8))) == [("4*2=8",)]


def test_m0_learns_two_solutions_each_attempt_after_the_first_and_the_instruction():
    P = [TASK.problem((7, 3, 5), 26), TASK.problem((5, 12, 75, 2), 84)]
    examples = score.two_attempt_examples(TASK, P, seed=0)
    assert len(examples) == 4
    from tasks import EOT, decode
    for p, (prompt1, c1), (prompt2, c2) in zip(P, examples[::2], examples[1::2]):
        y1, y2 = decode(c1[:-1]), decode(c2[:-1])
        assert c1[-1] == c2[-1] == EOT and TASK.check(p, y1) and TASK.check(p, y2)
        assert decode(prompt2) == decode(prompt1) + y1 + "\n" + score.INSTRUCTION + "\n"
    many = score.two_attempt_examples(TASK, P[1:] * 20, seed=1)  # 84 from 5 12 75 2: 18 ways
    assert len({tuple(c) for _, c in many[1::2]}) > 1


@pytest.mark.slow
def test_a_tiny_run_trains_every_arm_from_m0_and_resumes_after_an_interruption(tmp_path,
                                                                               monkeypatch):
    import train
    from common import read_jsonl
    out = str(tmp_path / "run")
    small = ["--method", "score", "--n-train", "8", "--n-unlabeled", "8", "--n-test", "4",
             "--steps", "4", "--stage1-steps", "1", "--stage2-steps", "1", "--problems", "2",
             "--group", "2", "--eval-every", "2", "--train-difficulty", "2",
             "--test-difficulty", "2", "--out", out]
    real_commit, real_data = score.commit, score.sft_data

    def gold_data(task, problems, y1, y2, seed):  # an untrained M0's chains are all wrong:
        gold = score.two_attempt_examples(task, problems, seed)[1::2]  # every arm gets data
        return {arm: gold for arm in real_data(task, problems, y1, y2, seed)}
    monkeypatch.setattr(score, "sft_data", gold_data)

    def crash_at_score(out, t0, *rows):
        if rows[-1]["arm"] == "score":
            raise KeyboardInterrupt  # killed after SCoRe's checkpoint, before its commit
        real_commit(out, t0, *rows)
    monkeypatch.setattr(score, "commit", crash_at_score)
    with pytest.raises(KeyboardInterrupt):
        train.main(small)
    before = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["arm"] for r in before if r["kind"] == "arm"] == list(score.ARMS[:-1])
    monkeypatch.setattr(score, "commit", real_commit)
    train.main(small)  # resumes: SCoRe alone, the committed arms kept as they were
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert rows[:len(before)] == before
    assert [r["arm"] for r in rows if r["kind"] == "arm"] == list(score.ARMS)
    # every arm tested at the end of stage I (step 1) and at its end (step 2)
    assert [(r["arm"], r["step"]) for r in rows if r["kind"] == "eval"] == \
        [("base", 0)] + [(arm, s) for arm in score.ARMS[1:] for s in (1, 2)]
    assert os.path.exists(os.path.join(out, "score.png"))
