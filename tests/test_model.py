"""
Guards model.py: the KV-cache sampler against the textbook sampler, ragged batches against one
prompt at a time, seeding, sequence_logprobs against a hand computation, masks, hidden states,
and the one-to-one mapping onto Hugging Face's GPT-2 parameter names; and common.py's
checkpoints, seeds and batch split.

Run: python -m pytest tests/test_model.py

The agreement tests run in float64 so that float rounding can never flip an argmax: what they
check is the algorithm (positions, masks, cache columns), not the arithmetic precision.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import model as model_module
from common import load_checkpoint, save_checkpoint, seed_for, split_batch
from model import (GPT, GPTConfig, KVCache, ScalarHead, decode_step, generate, generate_naive,
                   get_config, left_pad, padded_mask, sample_token, sampling_noise,
                   sequence_logprobs)

PAD = 99
TOKENIZER = "arith-char-v1"  # tasks.TOKENIZER; a checkpoint stores whatever name it is given


def random_model(seed=0, std=0.3, block_size=256, dtype=torch.float64):
    """A small random GPT with large weights, so positions and attention really matter
    (with GPT-2's 0.02 init the output is nearly the same token at every position)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=100, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model.to(dtype).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in lengths]


def test_greedy_cache_equals_full_recompute_over_100_tokens():
    model = random_model()
    prompt = prompts_of([9])[0]
    tokens, logp, lengths = generate(model, [prompt], 120, stop_tokens=(), pad_id=PAD,
                                     temperature=0)
    ref, ref_logp, ref_len = generate_naive(model, [prompt], 120, stop_tokens=(), pad_id=PAD,
                                            temperature=0)
    assert ref_len.tolist() == lengths.tolist() == [120]
    assert torch.equal(tokens, ref)
    assert torch.allclose(logp, ref_logp, atol=1e-6)
    assert len(set(ref[0].tolist())) > 5  # meaningful only if the output is not one token


def test_ragged_batch_equals_each_prompt_alone():
    model = random_model(1)
    prompts = prompts_of([3, 11, 1, 7, 16], seed=1)
    stop = (5, 17)  # two common-ish stop tokens, so some rows stop early and some do not
    tokens, logp, lengths = generate(model, prompts, 40, stop_tokens=stop, pad_id=PAD,
                                     temperature=0)
    assert len(set(lengths.tolist())) > 1  # some rows stopped early, some did not
    for b, p in enumerate(prompts):
        ref, ref_logp, ref_len = generate_naive(model, [p], 40, stop_tokens=stop, pad_id=PAD,
                                                temperature=0)
        n = ref_len.item()
        assert lengths[b].item() == n
        assert torch.equal(tokens[b], ref[0])  # the stop token kept, then padding
        assert (tokens[b, n:] == PAD).all()
        assert torch.allclose(logp[b], ref_logp[0], atol=1e-6)
        assert (logp[b, n:] == 0).all()


def test_stop_token_ends_a_row_and_is_kept():
    model = random_model(2)
    prompt = prompts_of([5], seed=2)[0]
    free = generate_naive(model, [prompt], 30, stop_tokens=(), pad_id=PAD,
                          temperature=0)[0][0].tolist()
    stop_tok = free[10]  # a token the model emits at step 10 (maybe earlier too)
    first = free.index(stop_tok)
    tokens, _, lengths = generate(model, [prompt, prompt], 30, stop_tokens=(stop_tok,),
                                  pad_id=PAD, temperature=0)
    assert lengths.tolist() == [first + 1, first + 1]
    assert tokens[0, first].item() == stop_tok
    assert tokens[0, :first + 1].tolist() == free[:first + 1]


def test_sampling_with_cache_equals_naive_sampling_same_generator():
    model = random_model(3)
    prompts = prompts_of([6, 2, 9], seed=3)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    out = generate(model, prompts, 50, stop_tokens=(5,), pad_id=PAD, temperature=0.8, top_k=20,
                   generator=g1)
    ref = generate_naive(model, prompts, 50, stop_tokens=(5,), pad_id=PAD, temperature=0.8,
                         top_k=20, generator=g2)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])
    assert torch.allclose(out[1], ref[1], atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_copies_of_a_prompt_equal_the_prompt_repeated_and_naive(temperature):
    # what search relies on: several continuations of each prefix from one prefill, with the
    # same tokens as the repeated prompts (cache rows copied, not recomputed) and as the naive
    # sampler; seeded per row, so sampled rows are checked too, not only greedy ones
    model = random_model(12)
    prompts, copies = prompts_of([5, 2, 8], seed=13), [3, 1, 2]
    seeds = list(range(100, 106))
    fast = generate(model, prompts, 20, (7,), PAD, temperature, seeds=seeds, copies=copies)
    repeated = [p for p, c in zip(prompts, copies) for _ in range(c)]
    plain = generate(model, repeated, 20, (7,), PAD, temperature, seeds=seeds)
    naive = generate_naive(model, prompts, 20, (7,), PAD, temperature, seeds=seeds,
                           copies=copies)
    for ref in (plain, naive):
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[2], ref[2])
        assert torch.allclose(fast[1], ref[1], atol=1e-6)
    if temperature > 0:  # copies of one prompt draw different samples
        assert len({tuple(r) for r in fast[0][:3].tolist()}) > 1
    with pytest.raises(ValueError, match="copies"):
        generate(model, prompts, 5, (), PAD, copies=[1, 0, 1])


class EchoTool:
    """A tool by hand: after its trigger it writes the row's token count so far, then 3, 3."""

    def __init__(self, trigger):
        self.trigger, self.calls = trigger, []

    def __call__(self, row, ids):
        self.calls.append((row, list(ids)))
        return [len(ids) % 50, 3, 3]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_tool_writes_after_its_trigger_and_the_cached_sampler_agrees_with_naive(temperature):
    model = random_model(5)
    prompts = prompts_of([4, 9, 2], seed=5)
    seeds = [11, 12, 13]
    free = generate(model, prompts, 60, stop_tokens=(), pad_id=PAD, temperature=temperature,
                    seeds=seeds)[0]
    trigger = free[0, 5].item()  # a token the model writes
    fast_tool, slow_tool = EchoTool(trigger), EchoTool(trigger)
    tokens, logp, lengths = generate(model, prompts, 60, stop_tokens=(), pad_id=PAD,
                                     temperature=temperature, seeds=seeds, tool=fast_tool)
    ref, ref_logp, ref_len = generate_naive(model, prompts, 60, stop_tokens=(), pad_id=PAD,
                                            temperature=temperature, seeds=seeds, tool=slow_tool)
    assert torch.equal(tokens, ref) and torch.equal(lengths, ref_len)
    assert torch.allclose(logp, ref_logp, atol=1e-6)
    assert fast_tool.calls == slow_tool.calls and len(fast_tool.calls) >= 2
    for row, ids in fast_tool.calls:  # the tool saw the row's tokens up to its trigger, and
        t = len(ids)  # what it returned follows them
        assert tokens[row, :t].tolist() == ids and ids[-1] == trigger
        assert tokens[row, t:t + 3].tolist() == [t % 50, 3, 3][:60 - t]
    assert not torch.equal(free, tokens)  # the tool changed what was written
    written = [[False] * n for n in lengths.tolist()]  # the sampler marks what the tool wrote
    for row, ids in fast_tool.calls:
        written[row][len(ids):len(ids) + 3] = [True] * len(written[row][len(ids):len(ids) + 3])
    assert fast_tool.written == slow_tool.written == written


def test_same_seed_same_samples_other_seed_other_samples():
    model = random_model(4)
    prompts = prompts_of([4, 8, 2], seed=4)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 30, stop_tokens=(), pad_id=PAD, temperature=1.0,
                        generator=g)[0]

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_row_seeds_make_a_rows_sample_independent_of_its_batch():
    # what lets torchrun split problems across processes without changing any sample
    model = random_model(4)
    prompts = prompts_of([4, 8, 2], seed=4)
    batch = generate(model, prompts, 30, (), PAD, temperature=1.0, seeds=[11, 12, 13])[0]
    for b, s in enumerate([11, 12, 13]):
        alone = generate(model, [prompts[b]], 30, (), PAD, temperature=1.0, seeds=[s])[0]
        assert torch.equal(batch[b], alone[0])
    other = generate(model, prompts, 30, (), PAD, temperature=1.0, seeds=[11, 99, 13])[0]
    assert torch.equal(other[0], batch[0]) and not torch.equal(other[1], batch[1])


def test_gumbel_max_sampling_follows_the_softmax():
    # 20,000 draws from a fixed 4-way distribution at temperature 0.5; each frequency within 5
    # standard errors of its probability (false failure < 1e-5 per token)
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).repeat(20_000, 1)
    u = sampling_noise(20_000, 1, 4, 0.5, torch.Generator().manual_seed(0), None, "cpu")[:, 0]
    freq = torch.bincount(sample_token(logits, 0.5, None, u), minlength=4).double() / 20_000
    p = F.softmax(logits[0].double() / 0.5, dim=-1)
    assert ((freq - p).abs() < 5 * (p * (1 - p) / 20_000).sqrt()).all()


def test_top_k_1_is_greedy_and_banned_tokens_never_appear():
    model = random_model(5)
    prompts = prompts_of([5, 9], seed=5)
    greedy = generate(model, prompts, 25, (), PAD, temperature=0)[0]
    top1 = generate(model, prompts, 25, (), PAD, temperature=1.0, top_k=1,
                    generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(greedy, top1)
    banned = tuple(set(greedy.flatten().tolist()))[:3]
    out = generate(model, prompts, 25, (), PAD, temperature=1.5,
                   generator=torch.Generator().manual_seed(0), banned_tokens=banned)[0]
    assert not torch.isin(out, torch.tensor(banned)).any()


def test_sequence_logprobs_matches_hand_computation():
    model = random_model(6)
    prompts = prompts_of([3, 7, 1], seed=6)
    completions = prompts_of([5, 2, 9], seed=7)
    total, per_tok = sequence_logprobs(model, prompts, completions, pad_id=PAD, per_token=True)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        # by hand: run the unpadded sequence alone, sum log-softmax at each completion token
        seq = torch.tensor([p + c])
        logits = model(seq)[0]
        hand = [F.log_softmax(logits[len(p) - 1 + i], -1)[c[i]].item() for i in range(len(c))]
        assert math.isclose(total[b].item(), sum(hand), abs_tol=1e-9)
        assert torch.allclose(per_tok[b, :len(c)], torch.tensor(hand, dtype=per_tok.dtype))
        assert (per_tok[b, len(c):] == 0).all()
    # the pad id is invisible: another pad token gives the same numbers
    assert torch.allclose(total, sequence_logprobs(model, prompts, completions, pad_id=3))


def test_sequence_logprobs_has_gradients_only_through_completion_terms():
    model = random_model(8, dtype=torch.float32).train()
    seen = []

    def keep_logits(module, inputs, logits):  # the logits sequence_logprobs reads
        logits.retain_grad()
        seen.append(logits)
    model.lm_head.register_forward_hook(keep_logits)
    prompts, comps = prompts_of([4, 2], seed=8), prompts_of([3, 1], seed=9)
    sequence_logprobs(model, prompts, comps, pad_id=PAD).sum().backward()
    grad = seen[0].grad.abs().sum(-1)  # (B, T-1): position t predicts token t+1
    for b, (p, c) in enumerate(zip(prompts, comps)):
        reads = set(range(len(p) - 1, len(p) + len(c) - 1))  # positions that predict c
        for t in range(grad.size(1)):
            assert (grad[b, t] > 0) == (t in reads), (b, t)  # prompt and padding: none
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_explicit_causal_mask_and_positions_equal_defaults():
    model = random_model(9)
    idx = torch.tensor(prompts_of([12, 12], seed=10))
    base, h = model(idx, return_hidden=True)
    mask = torch.ones(12, 12, dtype=torch.bool).tril().view(1, 1, 12, 12)
    pos = torch.arange(12).expand(2, 12)
    assert torch.allclose(model(idx, pos=pos, mask=mask), base)
    assert torch.allclose(model.lm_head(h), base)  # hidden is what the head reads


def test_chunked_prefill_with_cache_equals_one_forward():
    model = random_model(10)
    idx = torch.tensor(prompts_of([20], seed=11))
    full = model(idx)
    cache = KVCache(model.config, 1, 20, "cpu", torch.float64)
    a = model(idx[:, :8], cache=cache)
    b = model(idx[:, 8:], cache=cache)  # default mask: sees the cached 8 columns + causal
    assert cache.pos == 20
    assert torch.allclose(torch.cat([a, b], 1), full)


def test_left_pad_positions_and_mask():
    idx, pos, valid = left_pad([[1, 2, 3], [4]], PAD, "cpu")
    assert idx.tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    m = padded_mask(valid, 3)[:, 0]
    # row 1: the real token (col 2) sees only itself; the pad queries see only themselves
    assert m[1].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert m[0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_checkpoint_roundtrip_gives_identical_logits(tmp_path):
    model = random_model(11, dtype=torch.float32)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, TOKENIZER, extra={"step": 3})
    loaded, ckpt = load_checkpoint(path)
    idx = torch.tensor(prompts_of([15], seed=12))
    assert torch.equal(model(idx), loaded.eval()(idx))
    assert ckpt["tokenizer"] == TOKENIZER and ckpt["extra"] == {"step": 3}
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_parameter_names_map_onto_huggingface_gpt2():
    cfg = get_config("tiny")
    model = GPT(cfg)
    names = set(model.state_dict())
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias", "lm_head.weight"}
    for i in range(cfg.n_layer):
        for part in ["ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                     "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                     "attn.c_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias"]:
            expected.add(f"transformer.h.{i}.{part}")
    assert names == expected
    # HF's Conv1D stores (in, out); ours is nn.Linear (out, in): a transpose, nothing more
    assert model.state_dict()["transformer.h.0.attn.c_attn.weight"].shape == \
        (3 * cfg.n_embd, cfg.n_embd)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="tiny"):
        get_config("huge")


def test_scalar_head_reads_exactly_the_given_positions():
    # the head's output at a read must equal the head applied to the hidden state of that very
    # token of the unpadded sequence, whatever the batch-mates and padding
    model = random_model(13, dtype=torch.float32)
    scorer = ScalarHead(model)
    torch.nn.init.normal_(scorer.head.weight)
    prompts, comps = prompts_of([3, 6], seed=14), prompts_of([5, 2], seed=15)
    reads = [[0, 2, 4], [1]]
    logits, mask = scorer(prompts, comps, reads)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    for b, (p, c, r) in enumerate(zip(prompts, comps, reads)):
        _, h = model(torch.tensor([p + c]), return_hidden=True)
        for s, j in enumerate(r):
            want = scorer.head(h[0, len(p) + j]).item()
            assert math.isclose(logits[b, s].item(), want, rel_tol=1e-5, abs_tol=1e-6), (b, j)
    # a read one position off gives another number: the test can tell positions apart
    off = scorer(prompts, comps, [[1, 3, 4], [1]])[0]
    assert not math.isclose(off[0, 0].item(), logits[0, 0].item(), abs_tol=1e-4)


def test_split_batch_with_one_process_is_the_whole_batch_and_its_mean():
    batch = [("a", [1, 2]), ("b", [3]), ("c", [4, 5, 6])]
    assert split_batch(batch) == (batch, 3)
    assert split_batch(batch, size=lambda ex: len(ex[1])) == (batch, 6)


def test_seed_for_is_stable_and_separates_its_parts():
    assert seed_for(0, "star", 1, 2, 3) == seed_for(0, "star", 1, 2, 3)
    seeds = {seed_for(0, "star", n, i, j) for n in range(3) for i in range(30) for j in range(4)}
    assert len(seeds) == 3 * 30 * 4
    assert seed_for(1, 23) != seed_for(12, 3)  # no concatenation collisions
    assert 0 <= seed_for("x") < 2 ** 63


def test_bf16_autocast_cache_is_bf16_and_agrees_with_the_naive_sampler():
    # on a GPU the forward runs under bf16 autocast and the cache is kept in bf16; here the same
    # on the CPU. bf16 keeps 8 bits of mantissa (relative error up to 2^-8 = 0.4% per rounding),
    # so the cached and the recomputed keys may round differently: the tokens must agree (the
    # large-weight model keeps its logits far apart) and the log-probs within 0.05 nats
    model = random_model(14, std=0.5, dtype=torch.float32)
    prompts = prompts_of([7, 3, 12], seed=16)
    made = []
    real_init = KVCache.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self.k[0].dtype)
    KVCache.__init__ = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = generate(model, prompts, 40, (5,), PAD, temperature=0)
            naive = generate_naive(model, prompts, 40, (5,), PAD, temperature=0)
    finally:
        KVCache.__init__ = real_init
    assert made == [torch.bfloat16]
    assert torch.equal(fast[0], naive[0]) and torch.equal(fast[2], naive[2])
    assert (fast[1] - naive[1]).abs().max() < 0.05
    fp32 = generate(model, prompts, 40, (5,), PAD, temperature=0)
    assert (fp32[0] == fast[0]).float().mean() > 0.9  # bf16 changes little of the greedy text


def test_compiled_decode_step_gives_the_eager_tokens_and_is_traced_once(monkeypatch):
    # generate(compiled=True) decodes through decode_step with a fixed-shape cache (the new
    # column written at a tensor index, unwritten columns masked) under torch.compile. Traced
    # here with the aot_eager backend: dynamo and AOTAutograd build the graph inductor would
    # compile, without the C++ build (15-35 s on a 2-core CPU; tests/bench_sampling.py runs
    # inductor and asserts the same tokens). One trace for all the steps: a shape or a Python
    # value that changed per step would retrace every token.
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(model_module, "compiled_decode_step",
                        lambda device_type: torch.compile(decode_step, backend=counter))
    model = random_model(17)
    prompts, copies, stop = prompts_of([6, 1, 9], seed=18), [2, 1, 3], (5, 17)
    for kw in (dict(temperature=0), dict(temperature=1.0, seeds=list(range(6)), top_k=30)):
        eager = generate(model, prompts, 30, stop, PAD, copies=copies, **kw)
        compiled = generate(model, prompts, 30, stop, PAD, copies=copies, compiled=True, **kw)
        assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[2], compiled[2])
        assert torch.allclose(eager[1], compiled[1], atol=1e-9)
    assert counter.frame_count == 1  # the second call, with other noise, reused the trace
    assert eager[2].max() > 8  # some rows ran many steps through the compiled step
