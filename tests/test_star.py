"""
Guards star.py: the STaR loop end to end on a tiny model; rationalized examples are stored
without their hint; nothing the verifier rejects is trained on; restart vs continue start from
the right weights; a run interrupted mid-iteration and resumed writes the same metrics as one
that never stopped.

Run: python -m pytest tests/test_star.py   (CPU, about half a minute)

The loop-logic tests replace sampling and fine-tuning with stand-ins (monkeypatch), so they
check what the loop does with samples, not what a tiny model happens to generate.
"""

import json
import os

import pytest
import torch

import star
import train
from common import TokenCount, read_jsonl, save_checkpoint
from model import GPT, get_config
from tasks import PAD, TOKENIZER, decode, encode, get_task, sample_problems

TINY_RUN = ["--task", "addition", "--n-train", "16", "--n-unlabeled", "12", "--n-test", "12",
            "--steps", "30", "--star-steps", "8", "--iterations", "2", "--batch-size", "8",
            "--train-difficulty", "1-2", "--test-difficulty", "1-2", "--sample-batch-size", "64"]


def metrics_without_time(out):
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.mark.slow
def test_star_runs_end_to_end_and_writes_its_outputs(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--method", "star", "--out", out, "--direct-baseline"] + TINY_RUN)
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["iteration"] for r in rows if r["kind"] == "iteration"] == [0, 1, 2]
    assert [r["kind"] for r in rows].count("direct") == 1
    assert rows[2]["train_steps"] == round(8 * 1.2)  # steps grow per iteration
    control = next(r for r in rows if r["kind"] == "control")  # as many more steps, P alone
    assert control["train_steps"] == rows[2]["train_steps"] and len(control["right"]) == 12
    assert "iteration 2 - the step-matched control" in open(os.path.join(out, "summary.md")).read()
    for name in ["config.json", "summary.md", "accuracy.png", "start.pt", "model_iter2.pt",
                 "kept_iter1.jsonl", "samples_iter2.txt"]:
        assert os.path.exists(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, "model_iter1.pt"))  # only the newest is kept
    assert json.load(open(os.path.join(out, "config.json")))["method"] == "star"


@pytest.fixture
def loop_setup(tmp_path):
    """A task, P, D, a start checkpoint of a tiny model, and args as train.py resolves them."""
    task = get_task("addition")
    P = sample_problems(task, 4, [1, 2], seed=0)
    D = sample_problems(task, 10, [1, 2], seed=1)
    args = train.get_parser().parse_args(TINY_RUN)
    train.resolve(args, train.get_parser())
    torch.manual_seed(0)
    model = GPT(get_config("tiny", n_layer=1, n_embd=32, n_head=2))
    start = str(tmp_path / "start.pt")
    save_checkpoint(start, model, TOKENIZER)
    return task, P, D, args, model, start


def fake_sampler(task, right_without_hint, right_with_hint):
    """Stand-in for star.sample: gold completions for the chosen problems, wrong ones else."""
    def sample(model, task_, problems, hint=False, n=1, **kw):
        texts = []
        for i, p in enumerate(problems):
            ok = (right_with_hint if hint else right_without_hint)(i, p)
            wrong = task.completion(task.rationale(p), str(int(p.answer) + 1))
            texts.append([task.gold_completion(p) if ok else wrong] * n)
        return texts, TokenCount()
    return sample


def test_rationalized_examples_are_saved_without_the_hint(loop_setup, monkeypatch):
    task, P, D, args, model, start = loop_setup
    # the model solves nothing alone and everything with the hint
    monkeypatch.setattr(star, "sample", fake_sampler(task, lambda i, p: False, lambda i, p: True))
    seen = {}
    monkeypatch.setattr(star, "finetune", lambda m, ex, *a, **k: seen.setdefault("ex", ex) and 0.0)
    _, kept, stats = star.star_iteration(model, start, task, P, D, args, 1, "cpu")
    assert stats["kept_generated"] == 0 and stats["kept_rationalized"] == len(D)
    prompts = {decode(p) for p, _ in kept}
    assert prompts == {task.prompt(p) for p in D}  # the plain prompt, never the hinted one
    assert not any("H:" in s for s in prompts)


def test_rejected_samples_never_enter_the_training_set(loop_setup, monkeypatch):
    task, P, D, args, model, start = loop_setup
    monkeypatch.setattr(star, "sample", fake_sampler(task, lambda i, p: i % 2 == 0,
                                                     lambda i, p: i % 3 == 0))
    seen = {}
    monkeypatch.setattr(star, "finetune", lambda m, ex, *a, **k: seen.setdefault("ex", ex) and 0.0)
    _, kept, stats = star.star_iteration(model, start, task, P, D, args, 1, "cpu")
    by_prompt = {task.prompt(p, hint=h): p for p in D + P for h in (False, True)}
    for p_ids, c_ids in seen["ex"]:  # every example fine-tuned on: P's gold and the kept ones
        problem = by_prompt[decode(p_ids)]
        assert task.check(problem, decode(c_ids[:-1])), decode(p_ids) + decode(c_ids)
    assert stats["kept_generated"] == 5  # D's even indices
    # rationalization only saw the 5 failures, and kept those at indices 0 and 3 of them
    assert stats["kept_rationalized"] == 2


def step_sampler(task, D, wrong_step, right):
    """Stand-in for star.sample on D's problems: the gold rationale, its first step wrong where
    wrong_step(index in D, hint), ending in the right answer where right(index, hint), else 0."""
    def sample(model, task_, problems, hint=False, n=1, **kw):
        texts = []
        for p in problems:
            i, steps = D.index(p), task.rationale(p)
            steps = ["9+9+0=0 0 C0"] + steps[1:] if wrong_step(i, hint) else steps
            texts.append([task.completion(steps, p.answer if right(i, hint) else "0")] * n)
        return texts, TokenCount()
    return sample


def test_kept_rationales_with_a_wrong_step_are_counted_apart(loop_setup, monkeypatch):
    # every sample has the right answer; on even problems its first step is wrong
    task, P, D, args, model, start = loop_setup
    monkeypatch.setattr(star, "sample", step_sampler(task, D, lambda i, hint: i % 2 == 0,
                                                     lambda i, hint: True))
    monkeypatch.setattr(star, "finetune", lambda *a, **k: 0.0)
    _, kept, stats = star.star_iteration(model, start, task, P, D, args, 1, "cpu")
    assert len(kept) == len(D) and stats["kept_steps_ok"] == 0.5  # the answer check keeps all


def test_kept_share_counts_rationalized_samples_too(loop_setup, monkeypatch):
    # odd problems fail alone and pass with the hint; every hinted sample has a wrong first step
    task, P, D, args, model, start = loop_setup
    monkeypatch.setattr(star, "sample", step_sampler(task, D, lambda i, hint: hint,
                                                     lambda i, hint: hint or i % 2 == 0))
    monkeypatch.setattr(star, "finetune", lambda *a, **k: 0.0)
    _, kept, stats = star.star_iteration(model, start, task, P, D, args, 1, "cpu")
    assert stats["kept_generated"] == stats["kept_rationalized"] == 5
    assert stats["kept_steps_ok"] == 0.5  # the 5 rationalized ones have a wrong step


@pytest.mark.parametrize("restart", [True, False])
def test_step_control_starts_at_m0_and_trains_the_last_models_steps(loop_setup, monkeypatch,
                                                                    restart, tmp_path):
    task, P, D, args, model, start = loop_setup
    args.restart, args.iterations = restart, 2
    m0 = model.transformer.wte.weight.detach().clone()
    runs = []

    def record(m, examples, steps, *a, **k):
        runs.append((m.transformer.wte.weight.detach().clone(), len(examples), steps))
        with torch.no_grad():
            m.transformer.wte.weight.add_(1.0)  # training moves the weights
        return 0.0
    monkeypatch.setattr(star, "finetune", record)
    monkeypatch.setattr(star, "held_out_results", lambda *a: ({"accuracy": 0.0, "right": []}, []))
    star.run_step_control(args, task, P, [], str(tmp_path), start, "cpu")
    assert torch.equal(runs[0][0], m0) and all(n == 2 * len(P) for _, n, _ in runs)  # P, hinted
    assert [s for _, _, s in runs] == ([10] if restart else [8, 10])  # M2's steps beyond M0
    row = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[0]
    assert row["kind"] == "control" and row["train_steps"] == (10 if restart else 18)


@pytest.mark.parametrize("restart", [True, False])
def test_restart_and_continue_start_from_the_right_weights(loop_setup, monkeypatch, restart):
    task, P, D, args, model, start = loop_setup
    args.restart = restart
    prev = star.load_checkpoint(start)[0]  # the loader star.py itself uses
    with torch.no_grad():
        for p in prev.parameters():
            p.add_(1.0)  # M(n-1) differs from M0
    monkeypatch.setattr(star, "sample", fake_sampler(task, lambda i, p: True, lambda i, p: True))
    got = {}

    def record(m, ex, *a, **k):
        got["w"] = m.transformer.wte.weight.detach().clone()
        return 0.0
    monkeypatch.setattr(star, "finetune", record)
    star.star_iteration(prev, start, task, P, D, args, 1, "cpu")
    want = (model if restart else prev).transformer.wte.weight
    assert torch.equal(got["w"], want)


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_metrics(tmp_path, monkeypatch):
    ref = str(tmp_path / "uninterrupted")
    train.main(["--method", "star", "--out", ref] + TINY_RUN)

    out = str(tmp_path / "interrupted")
    real_finetune = star.finetune
    calls = {"n": 0}

    def dies_in_iteration_2(model, examples, steps, *a, desc="", **k):
        if desc.startswith("iter 2"):
            calls["n"] += 1
            raise KeyboardInterrupt  # Ctrl-C in the middle of iteration 2
        return real_finetune(model, examples, steps, *a, desc=desc, **k)

    monkeypatch.setattr(star, "finetune", dies_in_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--method", "star", "--out", out] + TINY_RUN)
    assert calls["n"] == 1
    assert [r["iteration"] for r in metrics_without_time(out)] == [0, 1]
    monkeypatch.setattr(star, "finetune", real_finetune)
    train.main(["--method", "star", "--out", out] + TINY_RUN)  # started again: resumes
    assert metrics_without_time(out) == metrics_without_time(ref)


def test_collate_targets_exactly_the_completion():
    # the loss covers every completion token (the first one is predicted from the prompt's last
    # position) and nothing else: no prompt token, no padding
    examples = [([10, 11, 12], [20, 21, 96]), ([13], [22, 96]), ([14, 15], [96])]
    idx, tgt = star.collate(examples, "cpu")
    assert idx.shape == tgt.shape == (3, 5)  # the longest sequence (6 tokens) minus one
    assert tgt.tolist() == [[-1, -1, 20, 21, 96],
                            [22, 96, -1, -1, -1],
                            [-1, 96, -1, -1, -1]]
    assert idx[0].tolist() == [10, 11, 12, 20, 21]  # inputs: the sequence without its last token
    assert idx[1, :2].tolist() == [13, 22] and (idx[1, 2:] == PAD).all()


def test_length_buckets_cover_the_batch_once_and_are_the_cheapest_split():
    import itertools
    import random as rnd
    rng = rnd.Random(0)
    for _ in range(30):
        lengths = [rng.randint(3, 120) for _ in range(rng.randint(1, 9))]
        overhead = rng.choice([0, 16, 128, 10**6])
        buckets = star.length_buckets(lengths, overhead)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        cost = lambda bs: sum(len(b) * max(lengths[i] for i in b) + overhead for b in bs)  # noqa
        # brute force: every split of the sorted lengths into consecutive runs
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))])
                   for r in range(len(order))
                   for cuts in itertools.combinations(range(1, len(order)), r))
        assert cost(buckets) == best


def test_bucketed_batch_gives_the_token_weighted_mean_loss_and_the_padded_gradient():
    # the same batch three ways: one padded forward (batch_loss), bucket by bucket
    # (batch_backward, what finetune runs), and each example alone, weighted by its tokens
    task = get_task("addition")
    batch = star.gold_examples(task, sample_problems(task, 12, (1, 3, 5), seed=3))
    assert len(star.length_buckets([len(p) + len(c) - 1 for p, c in batch], 16)) > 1
    torch.manual_seed(0)
    net = GPT(get_config("tiny", n_layer=2, n_embd=32, n_head=2)).double()
    alone = [star.summed_loss(net, [ex], "cpu", len(ex[1])).item() for ex in batch]
    weighted = sum(x * len(c) for x, (_, c) in zip(alone, batch)) / sum(len(c) for _, c in batch)
    padded = star.batch_loss(net, batch, "cpu")
    padded.backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    old, star.BUCKET_OVERHEAD = star.BUCKET_OVERHEAD, 16  # several buckets, not one
    try:
        got = star.batch_backward(net, batch, "cpu")
    finally:
        star.BUCKET_OVERHEAD = old
    assert abs(got - weighted) < 1e-12 and abs(padded.item() - weighted) < 1e-12
    for a, b in zip(want, net.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-12, rtol=0)


def test_completion_cap_reads_the_difficulty_not_the_problems(monkeypatch):
    # the sampler's length cap is a function of the task and the difficulty: the same for
    # problems with short and long gold answers, and room for every gold completion
    task = get_task("addition")
    for d in (1, 3, 5):
        fresh = sample_problems(task, 300, [d], seed=77)
        assert star.completion_cap(task, d) >= max(len(task.gold_completion(p)) + 1
                                                   for p in fresh)
    caps = []

    def spy(model, prompts, max_new, **kw):
        caps.append(max_new)
        B = len(prompts)
        return torch.full((B, 1), 96), torch.zeros(B, 1), torch.ones(B, dtype=torch.long)
    monkeypatch.setattr(star, "generate", spy)
    net = GPT(get_config("tiny", n_layer=1, n_embd=32, n_head=2))
    short = [p for p in sample_problems(task, 200, [3], seed=1) if len(p.answer) == 3][:5]
    long = [p for p in sample_problems(task, 200, [3], seed=2) if len(p.answer) == 4][:5]
    star.sample(net, task, short)
    star.sample(net, task, long)
    assert caps[0] == caps[1] == star.completion_cap(task, 3)


def test_sample_encodes_each_prompt_once_and_counts_what_it_computes(monkeypatch):
    # a problem's n samples share one prefill (generate's copies): its prompt is encoded and
    # counted once per batch, the samples are those of one row per sample, and the count is
    # what generate was given and returned
    task = get_task("countdown")
    torch.manual_seed(0)
    net = GPT(get_config("tiny", n_layer=1, n_embd=32, n_head=2)).eval()
    problems = sample_problems(task, 5, [3], seed=4)
    seen = {"prompt": 0, "sampled": 0}
    real = star.generate

    def spy(model, prompts, *a, **kw):
        out = real(model, prompts, *a, **kw)
        seen["prompt"] += sum(map(len, prompts))
        seen["sampled"] += int(out[2].sum())
        return out
    monkeypatch.setattr(star, "generate", spy)
    texts, cost = star.sample(net, task, problems, n=3, temperature=1.0, seed=2)
    assert (cost.prompt, cost.sampled) == (seen["prompt"], seen["sampled"])
    prompts = sum(len(encode(task.prompt(p))) for p in problems)
    assert cost.prompt == prompts  # once per problem, not once per sample
    alone, alone_cost = star.sample(net, task, problems, n=3, temperature=1.0, seed=2,
                                    batch_size=1)  # every sample its own batch and prefill
    assert alone == texts and alone_cost.prompt == 3 * prompts
    assert alone_cost.sampled == cost.sampled
