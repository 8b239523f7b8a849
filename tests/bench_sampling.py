"""
Benchmark: new tokens per second of batched greedy sampling, KV cache against full recompute.

Same model, same prompts (32 tokens), greedy, 128 new tokens, no early stop; the two outputs
are asserted identical token for token. Prints a table. Not collected by pytest (no test_ prefix).

  python tests/bench_sampling.py                      # preset gpu on cuda, tiny elsewhere
  python tests/bench_sampling.py --preset gpu --batch-sizes 1 64 512

The recompute baseline is model.generate_naive: the whole left-padded sequence through the
model for every new token, what sampling costs without a cache. On a GPU the sampler runs
under bf16 autocast and the recompute baseline too, so both see the same arithmetic.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import (GPT, PRESETS, autocast, autodetect_device, generate,  # noqa: E402
                   generate_naive, get_config)

PAD = 99


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="model size (default: gpu on cuda, tiny elsewhere)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default=autodetect_device())
    args = ap.parse_args()
    device = args.device
    preset = args.preset or ("gpu" if device == "cuda" else "tiny")
    torch.manual_seed(0)
    model = GPT(get_config(preset, block_size=args.prompt_len + args.new_tokens)).to(device)
    with torch.no_grad():  # larger weights than GPT-2's init: logits far apart, no argmax ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    model.eval()
    print(f"device {device} | preset {preset} ({model.num_params() / 1e6:.2f}M params) | "
          f"prompt {args.prompt_len} | new tokens {args.new_tokens} | greedy")
    print("| batch | KV cache tok/s | recompute tok/s | speed-up | identical |")
    print("|---|---|---|---|---|")
    for B in args.batch_sizes:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, 96, (B, args.prompt_len), generator=g).tolist()
        with autocast(device):
            generate(model, prompts[:2], 4, (), PAD, temperature=0)  # warm-up
            (fast, _, _), t_fast = timed(lambda: generate(
                model, prompts, args.new_tokens, (), PAD, temperature=0), device)
            (slow, _, _), t_slow = timed(lambda: generate_naive(
                model, prompts, args.new_tokens, (), PAD, temperature=0), device)
        same = torch.equal(fast, slow)
        n = B * args.new_tokens
        print(f"| {B} | {n / t_fast:,.0f} | {n / t_slow:,.0f} | {t_slow / t_fast:.1f}x | "
              f"{'yes' if same else 'NO'} |", flush=True)
        assert same, f"batch {B}: KV-cache and recompute outputs differ " \
                     f"({(fast == slow).all(1).float().mean():.3f} of rows identical)"


if __name__ == "__main__":
    main()
