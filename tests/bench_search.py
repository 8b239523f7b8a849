"""
Benchmark: what sharing a prefix's KV cache saves search.py (best-of-N pools, beam refills,
MCTS expansions, Math-Shepherd rollouts all sample many continuations of one prefix).

model.generate(copies=...) encodes each distinct prefix once and copies its cache rows to its
continuations (what star.continue_prefixes asks for); the baseline re-encodes the prefix for
every continuation (model.generate on the repeated prompts). Greedy, no early stop, so both
must return the same tokens (asserted). Prints a table. Not collected by pytest (no test_
prefix).

  python tests/bench_search.py                       # gpu preset on cuda, tiny elsewhere
  python tests/bench_search.py --prefixes 64 --copies 16 --prefix-len 64
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_sampling import timed  # noqa: E402
from common import autocast, autodetect_device  # noqa: E402
from model import GPT, PRESETS, generate, get_config  # noqa: E402

PAD = 99


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--preset", default=None, choices=list(PRESETS))
    ap.add_argument("--prefixes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--copies", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--prefix-len", type=int, nargs="+", default=[24, 96])
    ap.add_argument("--new-tokens", type=int, default=24, help="one step line is up to 24")
    ap.add_argument("--device", default=autodetect_device())
    args = ap.parse_args()
    device = args.device
    preset = args.preset or ("gpu" if device == "cuda" else "tiny")
    torch.manual_seed(0)
    model = GPT(get_config(preset, block_size=max(args.prefix_len) + args.new_tokens)).to(device)
    with torch.no_grad():  # logits far apart, so greedy ties cannot differ between the two
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    model.eval()
    print(f"device {device} | preset {preset} | {args.new_tokens} new tokens | greedy")
    print("| prefixes x copies | prefix tokens | shared ms | naive ms | speed-up | "
          "prompt tokens shared / naive | identical |")
    print("|---|---|---|---|---|---|---|")
    for U in args.prefixes:
        for M in args.copies:
            for L in args.prefix_len:
                g = torch.Generator().manual_seed(U * M + L)
                prefixes = torch.randint(0, 96, (U, L), generator=g).tolist()
                repeated = [p for p in prefixes for _ in range(M)]
                with autocast(device):
                    generate(model, prefixes[:2], 4, (), PAD, 0.0, copies=[2, 2])  # warm-up
                    (fast, _, _), t1 = timed(lambda: generate(
                        model, prefixes, args.new_tokens, (), PAD, 0.0, copies=[M] * U), device)
                    (slow, _, _), t2 = timed(lambda: generate(
                        model, repeated, args.new_tokens, (), PAD, 0.0), device)
                assert torch.equal(fast, slow), "shared and naive outputs differ"
                print(f"| {U} x {M} | {L} | {1e3 * t1:.0f} | {1e3 * t2:.0f} | {t2 / t1:.2f}x | "
                      f"{U * L:,} / {U * M * L:,} | yes |", flush=True)


if __name__ == "__main__":
    main()
