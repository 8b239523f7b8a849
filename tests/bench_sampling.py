"""
Benchmark: new tokens per second of batched greedy sampling: the KV-cache decode loop, eager and
compiled, against full recompute; and, when asked, the wall time of each method's default run.

Same model, same prompts (32 tokens), greedy, 128 new tokens, no early stop; the outputs are
asserted identical token for token. Prints a table. Not collected by pytest (no test_ prefix).

  python tests/bench_sampling.py                      # preset gpu on cuda, tiny elsewhere
  python tests/bench_sampling.py --preset gpu --batch-sizes 1 64 512
  python tests/bench_sampling.py --preset gpu --methods sft star vstar search quiet_star
  git worktree add ../before HEAD~1 && python tests/bench_sampling.py --against ../before
  python tests/bench_sampling.py --profile --batch-sizes 1 64   # where the decode loop's time goes
  python tests/bench_sampling.py --calculator out/vstar-countdown/generator_iter0.pt

The recompute baseline is model.generate_naive: the whole left-padded sequence through the
model for every new token, what sampling costs without a cache. "compiled" is generate's
compiled=True (model.compiled_decode_step: torch.compile, a CUDA graph on a GPU); its compile
time is excluded from the rate and printed beside it. "HF generate" is Hugging Face's
GPT2LMHeadModel.generate on the same weights (greedy, cache on), when transformers is installed
(it is not in requirements.txt; the column shows "-" without it). Eager, compiled and HF run 3
times each, alternating, and the medians are reported; the recompute baseline runs once. On a
GPU every sampler runs under bf16 autocast, so all see the same arithmetic. --methods runs
`python train.py --method M --preset P` for each M in turn (output under runs/bench/) and
prints its wall time. --against DIR times the eager sampler of DIR/model.py (another
checkout) against this one's, in one process, alternating 8 times on the same weights and
prompts: an A/B that a noisy machine cannot bias. --calculator CKPT times star.sample of a
trained countdown generator on 64 countdown problems (its own stops and length caps), with and
without the calculator writing each result, alternating 3 times: sampled tokens per second
(the calculator's included), and the share of them it wrote.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import autocast, autodetect_device  # noqa: E402
from model import GPT, PRESETS, generate, generate_naive, get_config  # noqa: E402

PAD = 99


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def hugging_face_twin(model):
    """The same weights in transformers' GPT2LMHeadModel (None when transformers is not
    installed: it is not a requirement of this project). Its Conv1D weights are our Linear
    weights transposed."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size,
                                    n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                                    activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: v.t() if k.endswith(conv1d) else v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=False)  # strict=False: HF's own attention-bias buffers
    return hf.to(next(model.parameters()).device).eval()


def hf_generate(hf, prompts, new_tokens):
    """Greedy continuation by transformers' generate, exactly new_tokens long, no stop."""
    idx = torch.tensor(prompts, device=hf.device)
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=PAD, use_cache=True)
    return out[:, idx.size(1):]


def profile(preset, batch_sizes, prompt_len, new_tokens, device):
    """Where the eager decode loop's time goes: the operators by their own time, per batch."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler
    torch.manual_seed(0)
    model = GPT(get_config(preset, block_size=prompt_len + new_tokens)).to(device).eval()
    for B in batch_sizes:
        prompts = torch.randint(0, 96, (B, prompt_len)).tolist()
        generate(model, prompts, 8, (), PAD, temperature=0)  # warm-up
        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, prompts, new_tokens, (), PAD, temperature=0)
        print(f"batch {B}, {new_tokens} new tokens:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def calculator(checkpoint, batch_sizes, device):
    """Sampled tokens/s of star.sample with and without the countdown calculator, alternating."""
    import star
    from common import load_checkpoint
    from tasks import get_task, sample_problems
    model = load_checkpoint(checkpoint, device)[0].eval()
    off = get_task("countdown")
    on = off.with_calculator("result")
    problems = sample_problems(off, 64, [2, 3, 4], seed=12345)
    print(f"| batch | calculator off tok/s | calculator on tok/s | on / off | written by it |\n"
          "|---|---|---|---|---|")
    for B in batch_sizes:
        rates, written = {"off": [], "on": []}, 0
        for rep in range(3):
            for name, task in (("off", off), ("on", on)) if rep % 2 else (("on", on), ("off", off)):
                (texts, count), t = timed(lambda: star.sample(model, task, problems,
                                                              batch_size=B), device)
                rates[name].append(count.sampled / t)
                if name == "on":
                    written = sum(sum(star.tool_written(on, p, x[0]))
                                  for p, x in zip(problems, texts)) / count.sampled
        off_rate, on_rate = (statistics.median(rates[k]) for k in ("off", "on"))
        print(f"| {B} | {off_rate:,.0f} | {on_rate:,.0f} | {on_rate / off_rate:.2f}x | "
              f"{written:.0%} |", flush=True)


def against(other_dir, preset, batch_sizes, prompt_len, new_tokens, device):
    """Median new tokens/s of this generate and of other_dir/model.py's, alternating."""
    spec = importlib.util.spec_from_file_location("other_model",
                                                  os.path.join(other_dir, "model.py"))
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    torch.manual_seed(0)
    ours = GPT(get_config(preset, block_size=prompt_len + new_tokens)).to(device).eval()
    theirs = other.GPT(other.get_config(preset, block_size=prompt_len + new_tokens))
    theirs.load_state_dict(ours.state_dict())
    theirs = theirs.to(device).eval()
    print(f"| batch | {other_dir} tok/s | this tree tok/s | this / that |\n|---|---|---|---|")
    for B in batch_sizes:
        prompts = torch.randint(0, 96, (B, prompt_len),
                                generator=torch.Generator().manual_seed(B)).tolist()
        runs = [("that", other.generate, theirs), ("this", generate, ours)]
        times = {"that": [], "this": []}
        for rep in range(8):
            for name, gen, model in runs if rep % 2 else runs[::-1]:
                with autocast(device):
                    times[name].append(timed(lambda: gen(model, prompts, new_tokens, (), PAD,
                                                         temperature=0), device)[1])
        that, this = statistics.median(times["that"]), statistics.median(times["this"])
        n = B * new_tokens
        print(f"| {B} | {n / that:,.0f} | {n / this:,.0f} | {that / this:.2f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="model size (default: gpu on cuda, tiny elsewhere)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default=autodetect_device())
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    ap.add_argument("--methods", nargs="*", default=[],
                    help="also time these methods' default runs with this preset")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's table of the eager sampler's operators instead")
    ap.add_argument("--against", metavar="DIR",
                    help="A/B the eager sampler against DIR/model.py (another checkout)")
    ap.add_argument("--calculator", metavar="CKPT",
                    help="star.sample of this countdown generator with and without the calculator")
    args = ap.parse_args()
    device = args.device
    preset = args.preset or ("gpu" if device == "cuda" else "tiny")
    if args.profile:
        return profile(preset, args.batch_sizes, args.prompt_len, args.new_tokens, device)
    if args.calculator:
        return calculator(args.calculator, args.batch_sizes, device)
    if args.against:
        return against(args.against, preset, args.batch_sizes, args.prompt_len,
                       args.new_tokens, device)
    torch.manual_seed(0)
    model = GPT(get_config(preset, block_size=args.prompt_len + args.new_tokens)).to(device)
    with torch.no_grad():  # larger weights than GPT-2's init: logits far apart, no argmax ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    model.eval()
    hf = hugging_face_twin(model)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"device {name} | preset {preset} ({model.num_params() / 1e6:.2f}M params) | "
          f"prompt {args.prompt_len} | new tokens {args.new_tokens} | greedy | "
          f"torch {torch.__version__}")
    print("| batch | eager tok/s | compiled tok/s (compile s) | recompute tok/s | "
          "HF generate tok/s | compiled / eager | eager / recompute | eager / HF | identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B in args.batch_sizes:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, 96, (B, args.prompt_len), generator=g).tolist()

        def run(sampler=generate, **kw):
            return timed(lambda: sampler(model, prompts, args.new_tokens, (), PAD,
                                         temperature=0, **kw)[0], device)
        with autocast(device):
            generate(model, prompts[:2], 4, (), PAD, temperature=0)  # warm-up
            outputs, t_fast, t_comp, t_hf = [], [], [], []
            if not args.no_compile:
                _, t_compile = run(compiled=True)  # compiles for this batch shape
            for _ in range(3):  # eager and compiled alternate; the medians are reported
                out, t = run()
                outputs.append(out)
                t_fast.append(t)
                if not args.no_compile:
                    out, t = run(compiled=True)
                    outputs.append(out)
                    t_comp.append(t)
                if hf is not None:
                    out, t = timed(lambda: hf_generate(hf, prompts, args.new_tokens), device)
                    outputs.append(out)
                    t_hf.append(t)
            t_fast = statistics.median(t_fast)
            compiled = "-"
            if not args.no_compile:
                t_comp = statistics.median(t_comp)
                compiled = f"{B * args.new_tokens / t_comp:,.0f} ({t_compile:.0f})"
            slow, t_slow = run(generate_naive)
        same = all(torch.equal(o, slow) for o in outputs)
        n = B * args.new_tokens
        ratio = "-" if args.no_compile else f"{t_fast / t_comp:.2f}x"
        t_hf = statistics.median(t_hf) if t_hf else None
        hf_rate, hf_ratio = ("-", "-") if t_hf is None else (f"{n / t_hf:,.0f}",
                                                             f"{t_hf / t_fast:.2f}x")
        print(f"| {B} | {n / t_fast:,.0f} | {compiled} | {n / t_slow:,.0f} | {hf_rate} | "
              f"{ratio} | {t_slow / t_fast:.1f}x | {hf_ratio} | {'yes' if same else 'NO'} |",
              flush=True)
        assert same, f"batch {B}: the samplers' outputs differ"
    for method in args.methods:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [sys.executable, "train.py", "--method", method, "--preset", preset,
               "--device", device, "--out", os.path.join("runs", "bench", method)]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=root).returncode
        print(f"| {method} | {' '.join(cmd[1:])} | {time.perf_counter() - t0:,.0f} s | "
              f"exit {rc} |", flush=True)


if __name__ == "__main__":
    main()
