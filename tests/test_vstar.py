"""
Guards vstar.py: the DPO loss against its hand formula and one optimiser step's effect; the
best-of-k, pass@k and majority@k estimators (common.py) against brute-force enumeration of every
k-subset;
verifier scores that padding and batch-mates cannot change; GenRM's p(Yes) and the learned recheck's
product of step probabilities by hand; tie-aware pair accuracy and the bootstrap interval; the
V-STaR run end to end.

Run: python -m pytest tests/test_vstar.py
"""

import math
import os
import random
from functools import partial
from itertools import combinations

import pytest
import torch

import common
import train
import vstar
from common import bootstrap_ci, read_jsonl
from model import GPT, GPTConfig, ScalarHead, sequence_logprobs
from tasks import EOT, Problem, decode, encode, get_task, sample_problems

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
        assert math.isclose(common.best_of_k(scores, correct, k),
                            brute_best_of_k(scores, correct, k), abs_tol=1e-12)
        brute_pass = sum(any(correct[i] for i in s) for s in combinations(range(n), k)) / \
            math.comb(n, k)
        assert math.isclose(common.pass_at_k(n, sum(correct), k), brute_pass, abs_tol=1e-12)
        assert math.isclose(common.pass_at_k(n, sum(correct), k),
                            1 - math.comb(n - sum(correct), k) / math.comb(n, k))
        assert math.isclose(common.majority_at_k(answers, {"8"}, k),
                            brute_majority(answers, {"8"}, k), abs_tol=1e-12)
        # several right answers (countdown: every right trace is its own answer)
        assert math.isclose(common.majority_at_k(answers, {"8", "9"}, k),
                            brute_majority(answers, {"8", "9"}, k), abs_tol=1e-12)


def test_an_unparsable_answer_never_wins_the_vote():
    assert common.majority_at_k([None, None, None], {None}, 2) == 0.0
    assert common.majority_at_k([None, None, "3"], {"3"}, 3) == 1.0
    assert common.majority_at_k(["3", "4"], set(), 2) == 0.0  # no right answer in the pool


def test_verifier_scores_ignore_padding_and_batch_mates():
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    orm = ScalarHead(gpt)
    torch.nn.init.normal_(orm.head.weight)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    comps = [[20, 21, 96], [22, 96], [23, 24, 25, 26, 27, 96]]
    for kind, score in [("orm", partial(vstar.head_scores, orm)),
                        ("logprob", partial(vstar.logprob_scores, gpt)),
                        ("mean logprob", partial(vstar.logprob_scores, gpt, mean=True)),
                        ("genrm", partial(vstar.genrm_scores, gpt))]:
        together = score(prompts, comps)
        alone = [score([p], [c])[0] for p, c in zip(prompts, comps)]
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
                   for a, b in zip(together, alone)), kind
    # per token: one value per completion token, alone as in a batch, summing to the total
    together = vstar.token_logprobs(gpt, prompts, comps)
    assert [len(t) for t in together] == [len(c) for c in comps]
    for p, c, t, total in zip(prompts, comps, together, vstar.logprobs(gpt, prompts, comps)):
        alone = vstar.token_logprobs(gpt, [p], [c])[0]
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(t, alone))
        assert math.isclose(sum(t), total, rel_tol=1e-5)


def test_genrm_score_is_p_yes_after_the_question_by_hand():
    torch.manual_seed(2)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    prompts = [encode("Q: 3 4 T: 12\n"), encode("Q: 5 T: 5\n")]
    comps = [encode("4*3=12\nA: 12") + [EOT], encode("A: 5") + [EOT]]
    got = vstar.genrm_scores(gpt, prompts, comps)
    for p, c, score in zip(prompts, comps, got):
        # what GenRM reads: problem, solution without its end-of-text, the question
        text = decode(p) + decode(c[:-1]) + "\nIs the answer correct? "
        with torch.no_grad():
            probs = torch.softmax(gpt(torch.tensor([encode(text)]))[0, -1], -1)
        assert math.isclose(score, probs[encode("Y")[0]].item(), rel_tol=1e-5)
    assert got[0] != got[1]


def test_recheck_score_is_the_product_of_each_claims_probability_by_hand():
    # p(Yes) of the learned recheck = prod over steps of p(claimed result + newline | the step)
    torch.manual_seed(3)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    task = get_task("countdown")
    texts = ["4*3=12\n12+5=17\nA: 17", "4*3=12\n", "4*3=12\n12+5=17", "4*3=1x\nA: 1"]
    probs = [Problem("4 3 5 T: 17", "17", 3, ((4, 3, 5), 17))] * 4
    got = vstar.recheck_scores(gpt, task, probs, texts, finished=[True, False, True, True])

    def p_claim(step, claim):
        ids = encode(step + claim + "\n")
        with torch.no_grad():
            logp = torch.log_softmax(gpt(torch.tensor([ids[:-1]]))[0], -1)
        return math.exp(sum(logp[j - 1, ids[j]].item() for j in range(len(step), len(ids))))

    assert math.isclose(got[0], p_claim("4*3=", "12") * p_claim("12+5=", "17"), rel_tol=1e-4)
    assert math.isclose(got[1], p_claim("4*3=", "12"), rel_tol=1e-4)  # a prefix: its steps
    assert got[2] == 0.0 and got[3] == 0.0  # finished without an answer; not a step
    one_by_one = [vstar.recheck_scores(gpt, task, probs[:1], [t], [f], batch_size=1)[0]
                  for t, f in zip(texts, [True, False, True, True])]
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(got, one_by_one))
    # its training rows: every step of right and wrong samples alike, with the right result
    labelled = [(encode("Q: 3 4 T: 12\n"), encode("4*3=12\nA: 12") + [EOT], True),
                (encode("Q: 3 4 T: 7\n"), encode("4*3=7\nA: 7") + [EOT], False)]
    assert [(decode(q), decode(c)) for q, c in vstar.recheck_examples(task, labelled)] == \
        [("4*3=", "12\n"), ("4*3=", "12\n")]


def test_the_recheck_scores_no_solution_it_cannot_cover_above_a_right_one():
    # The rule around the learned arithmetic (task.rules_ok): no steps, an unfinished solution,
    # an operand that is not left, a last number off the target: 0, below a right solution,
    # whatever the verifier; and every covered solution has as many steps as any other
    torch.manual_seed(4)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    task = get_task("countdown")
    p = Problem("4 3 5 T: 17", "17", 3, ((4, 3, 5), 17))
    right = "4*3=12\n12+5=17\nA: 17"
    bad = ["A: 17", "A: 17\n", "4*3=12\nA: 17",  # no steps; unfinished
           "4*4=16\n16+1=17\nA: 17",            # 4 used twice, 1 never given
           "4*3=12\n12-5=7\nA: 17",             # ends at 7, not the target
           "4*3=12\n12+5=17\n17*1=17\nA: 17"]  # an extra step on an unavailable 1
    scores = vstar.recheck_scores(gpt, task, [p] * (len(bad) + 1), [right] + bad)
    assert scores[0] > 0 and all(s == 0.0 for s in scores[1:])
    for q in sample_problems(task, 30, [2, 3, 4], seed=5):
        gold = task.gold_completion(q)
        assert task.rules_ok(q, gold) and len(task.recheck(gold)) == len(q.data[0]) - 1
        assert not task.rules_ok(q, gold, finished=False)  # a prefix has no answer line
        assert task.rules_ok(q, gold[:gold.rindex("\nA:")], finished=False)
    for text in ("", "\n", "A:", "1+1=2\nA: 2\nA: 2", "9" * 40, "1+=\n"):  # never raises
        assert not task.rules_ok(p, text) and not task.rules_ok(p, text, finished=False)


def test_the_format_control_learns_the_rechecks_labels_at_the_end_of_each_step():
    # the scalar head on program labels: step k's label is whether its arithmetic is right
    # (what the recheck learns to recompute), read at the end of step k; no outcome label
    task = get_task("countdown")
    p = Problem(question="3 4 5 T: 27", answer="27", difficulty=3, data=((3, 4, 5), 27))
    texts = ["5+4=9\n9*3=27\nA: 27",    # right
             "5+4=9\n9*3=28\nA: 27",    # an arithmetic slip in step 2
             "5*4=20\n20+3=23\nA: 27",  # right arithmetic, off the target (the rule's part)
             "5+4=10\n10*3=27\nA: 27",  # two slips, yet the claims add up to the target
             "5+4=9\nhello\nA: 27"]     # no rationale: left out
    labelled = [(encode(task.prompt(p)), encode(t) + [EOT], task.check(p, t)) for t in texts]
    rows = vstar.program_step_rows(task, labelled)
    assert [labels for _, _, _, labels in rows] == [[1, 1], [1, 0], [1, 1], [0, 0]]
    assert all(reads == vstar.step_reads(c)[:2] for _, c, reads, _ in rows)
    assert [decode([c[r]]) for _, c, reads, _ in rows for r in reads] == ["\n"] * 8
    head = ScalarHead(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))).eval()
    got = vstar.program_scores(head, task, [p] * 5, texts)
    assert got[0] == pytest.approx(0.25, rel=1e-6) == got[3]  # a zero head: 1/2 per step
    # the rule: the last claimed number (28, 23) is not the target; no rationale at all
    assert got[1] == got[2] == got[4] == 0.0


def test_dpo_pairs_every_right_with_every_wrong_or_each_wrong_with_its_nearest_right():
    # problem [1]: rights 5 6 7 and 5 9, wrongs 5 6 8 and 4; problem [2]: only a wrong one
    rows = [([1], [5, 6, 7], True), ([1], [5, 9], True), ([1], [5, 6, 8], False),
            ([1], [4], False), ([2], [3], False)]
    assert sorted(vstar.pairs_of(rows)) == sorted(
        [([1], r, w) for r in ([5, 6, 7], [5, 9]) for w in ([5, 6, 8], [4])])
    # 5 6 8 shares two tokens with 5 6 7 and one with 5 9; 4 shares none (the first right wins)
    assert vstar.pairs_of(rows, nearest=True) == [([1], [5, 6, 7], [5, 6, 8]),
                                                  ([1], [5, 6, 7], [4])]


def test_pair_accuracy_counts_a_tie_as_half_on_a_hand_example():
    # problem 0: right samples scored 3 and 1, wrong ones 1 and 0 -> pairs (3,1) win, (3,0) win,
    # (1,1) tie, (1,0) win; problem 1 has no wrong sample and adds no pair
    acc, ties = vstar.pair_accuracy([[True, True, False, False], [True]], [[3, 1, 1, 0], [5]])
    assert (acc, ties) == ((3 + 0.5) / 4, 1 / 4)
    # a score that ranks every pair backwards, and a constant one (no preference at all)
    assert vstar.pair_accuracy([[True, False]], [[0, 1]]) == (0.0, 0.0)
    assert vstar.pair_accuracy([[True, False, True]], [[7, 7, 7]]) == (0.5, 1.0)


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_problems():
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(values)
    assert lo < 0.3 < hi and 0.1 < hi - lo < 0.25  # binomial: +-1.96 * 0.046
    lo4, hi4 = bootstrap_ci(values * 4)
    assert hi4 - lo4 < 0.6 * (hi - lo)  # 4x the problems: about half the width
    assert bootstrap_ci([0.2] * 10) == (0.2, 0.2)



def test_regime_map_pools_runs_by_number_count():
    # two runs of 2 problems each (numbers 2 and 3); at k = 1 and k = 4. In both runs dpo reaches
    # pass@4 on the 2-number problem and stays at pass@1 on the 3-number one; the generator's
    # log-prob closes half of the 2-number gap and all of the 3-number one; majority none.
    def run(p1, p4):
        bp = {"pass@k": [p1, p4], "best-of-k dpo": [p1, [p4[0], p1[1]]],
              "best-of-k generator": [p1, [(p1[0] + p4[0]) / 2, p4[1]]], "majority@k": [p1, p1]}
        return {"k": [1, 4], "difficulty": [2, 3], "by_problem": bp}
    evs = [run([0.5, 0.0], [1.0, 0.5]), run([0.2, 0.1], [0.6, 0.3])]
    lines = vstar.regime_map(evs)
    assert lines[0].split(" | ")[4:] == ["gap closed at k = 4: majority", "generator", "dpo |"]
    cells = {int(line.split(" | ")[0][2:]): line.split(" | ")[1:] for line in lines[2:]}
    # numbers 2: pass@1 (0.5 + 0.2) / 2, pass@4 (1.0 + 0.6) / 2; majority 0%, generator 50%
    assert cells[2] == ["2", "0.350", "0.800", "0%", "50%", "100% |"]
    assert cells[3] == ["2", "0.050", "0.400", "0%", "100%", "0% |"]


def test_the_strongest_free_signal_is_chosen_on_the_other_half():
    # majority is right on the even problems, the generator on the odd ones, dpo on none:
    # chosen on the other half, each half's baseline is wrong on it (chosen on the same
    # problems, dpo would trail a perfect baseline by 1)
    bp = {"pass@k": [[0.0] * 4, [1.0] * 4], "best-of-k dpo": [[0.0] * 4, [0.0] * 4],
          "majority@k": [[0.0] * 4, [1.0, 0.0, 1.0, 0.0]],
          "best-of-k generator": [[0.0] * 4, [0.0, 1.0, 0.0, 1.0]]}
    got = vstar.against_free({"k": [1, 4], "difficulty": [2] * 4, "by_problem": bp},
                             "best-of-k dpo")
    assert got[2][0] == "generator / majority" and got[2][1][0] == 0.0

@pytest.mark.slow
def test_vstar_runs_end_to_end(tmp_path, sampler_tools):
    tools = sampler_tools
    out = str(tmp_path / "run")
    train.main(["--method", "vstar", "--out", out, "--n-train", "16", "--n-unlabeled", "8",
                "--n-test", "6", "--steps", "20", "--batch-size", "8", "--samples", "4",
                "--eval-samples", "4", "--verifier-steps", "3", "--iterations", "1",
                "--train-difficulty", "2-3", "--test-difficulty", "2-3", "--temperature", "1.5",
                "--calculator", "result"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r.get("iteration") for r in rows] == [0, 1, None]
    ev = rows[-1]
    assert ev["k"] == [1, 2, 4]
    for key in ["pass@k", "majority@k", "best-of-k dpo", "best-of-k orm"]:
        assert len(ev[key]) == 3 and all(0 <= x <= 1 for x in ev[key])
    # pass@k is an upper bound of every selection rule
    for key in ["majority@k", "best-of-k dpo", "best-of-k dpo-mean", "best-of-k orm",
                "best-of-k generator", "best-of-k length"]:
        assert all(x <= p + 1e-12 for x, p in zip(ev[key], ev["pass@k"])), key
    # no preference at all picks a random sample: pass@1 at every k, pairs ranked at 1/2
    assert all(abs(x - ev["pass@k"][0]) < 1e-12 for x in ev["best-of-k random"])
    assert ev["pair_acc random"] in (0.5, None) or math.isnan(ev["pair_acc random"])
    assert os.path.exists(os.path.join(out, "vstar.png"))
    assert len(tools) >= 4 and all(tools)  # every sample (greedy ones too) had the calculator
    # with a calculator, the generator's confidence in its own tokens is a scorer too
    assert len(ev["best-of-k generator (own tokens)"]) == 3
    # the task's rule alone is a free signal: a program, it reads no token
    assert len(ev["best-of-k rule"]) == 3 and ev["tokens"]["rule"] == 0.0
    # each test problem's number count in the test set's order (sample_problems: problem i at
    # difficulties[i % 2]): the regime map's bins
    assert ev["difficulty"] == [2, 3] * 3
