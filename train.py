"""
The one command line: python train.py --method {sft,star} [--task T] [--preset P] [flags]

  python train.py --method sft --task addition     # the model trained on worked examples P
  python train.py --method star                    # STaR on addition (the README's main command)
  python train.py --method star --no-rationalize   # the ablation of the paper's Figure 4
  python train.py --method star --preset gpu       # the GPU experiment (one H100)

Each run writes out/<run>/: config.json (every resolved setting), metrics.jsonl (a row per
iteration), model checkpoints, samples_iter<n>.txt, accuracy.png and summary.md. Started again on
the same folder, a run continues after its last finished iteration. This file only parses flags,
builds the data and writes the report; the methods live in their own files.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

if int(os.environ.get("RANK", "0")) > 0:  # torchrun's other processes: no progress bars
    os.environ["TQDM_DISABLE"] = "1"  # (tqdm reads it when it is first imported)
import torch

import quiet_star
import search
import star
import vstar
from model import GPT, PRESETS, autodetect_device, get_config, is_main, load_checkpoint, rank_world
from tasks import TASKS, encode, get_task, sample_problems

METHODS = {"sft": star, "star": star, "vstar": vstar, "search": search, "quiet_star": quiet_star}
DEFAULT_TASK = {"sft": "addition", "star": "addition", "vstar": "expression",
                "search": "countdown", "quiet_star": "addition"}

# Run sizes per preset: "tiny" fits a 2-core CPU in minutes, "gpu" one H100 in well under 10.
# Every one of them can be overridden by its flag.
RUN_DEFAULTS = {
    "tiny": dict(n_train=300, n_unlabeled=600, n_test=300, steps=1500, batch_size=32, lr=2e-3,
                 iterations=4, star_steps=400, sample_batch_size=300, verifier_steps=300,
                 eval_samples=16),
    "small": dict(n_train=300, n_unlabeled=2000, n_test=500, steps=3000, batch_size=64, lr=1e-3,
                  iterations=6, star_steps=800, sample_batch_size=500, verifier_steps=1000,
                  eval_samples=32),
    "gpu": dict(n_train=300, n_unlabeled=10000, n_test=2000, steps=3000, batch_size=256,
                lr=1e-3, iterations=8, star_steps=1000, sample_batch_size=2048,
                verifier_steps=2000, eval_samples=64),
}
TASK_DEFAULTS = {  # (train, test) difficulties when the flags are not given: CPU, then GPU
    "addition": {"cpu": ("1-5", "1-6"), "gpu": ("1-8", "1-10")},
    "expression": {"cpu": ("1-4", "1-5"), "gpu": ("1-6", "1-8")},
    "countdown": {"cpu": ("2-4", "2-4"), "gpu": ("2-5", "2-5")},
}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad input: one line naming the bad value and the valid choices, exit code 2."""
        sys.stderr.write(f"train.py: error: {message}\n")
        sys.exit(2)


def positive(cast):
    def check(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value
    check.__name__ = f"positive {cast.__name__}"
    return check


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def get_parser():
    p = Parser(description="Self-taught reasoning from scratch: one command for every method.")
    # what to run
    p.add_argument("--method", default="star", choices=sorted(METHODS),
                   help="sft: train on the worked examples P only; star: STaR on top of it; "
                        "vstar: V-STaR (generator iterations, DPO verifier, best-of-k); "
                        "search: test-time search at equal compute; quiet_star: Quiet-STaR")
    p.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="task family (default: addition; expression for vstar)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="model and run size: tiny (CPU, minutes), small, gpu (one H100)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of data and sampling")
    p.add_argument("--out", default=None, help="output folder (default out/<method>-<task>)")
    p.add_argument("--checkpoint", default=None,
                   help="start from this model instead of training M0 on P")
    # data
    p.add_argument("--n-train", type=positive(int), help="size of P, problems with gold rationales")
    p.add_argument("--n-unlabeled", type=positive(int),
                   help="size of D, problems with answers but no rationales (STaR)")
    p.add_argument("--n-test", type=positive(int), help="held-out test problems")
    p.add_argument("--train-difficulty", default=None,
                   help="difficulties of P and D, e.g. 1-5 or 1,2,4 (addition: digits)")
    p.add_argument("--test-difficulty", default=None, help="difficulties of the test set")
    # optimisation
    p.add_argument("--steps", type=positive(int), help="fine-tuning steps on P (M0)")
    p.add_argument("--batch-size", type=positive(int), help="examples per training step")
    p.add_argument("--lr", type=positive(float), help="peak learning rate")
    p.add_argument("--sample-batch-size", type=positive(int), help="prompts per sampling batch")
    # STaR
    p.add_argument("--iterations", type=non_negative_int, help="STaR iterations after M0")
    p.add_argument("--samples", type=positive(int), default=None,
                   help="samples per problem per iteration (STaR: 1, as the paper; V-STaR: 8)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 is greedy (STaR's default, as the paper; "
                        "V-STaR: 0.7)")
    p.add_argument("--no-rationalize", dest="rationalize", action="store_false",
                   help="skip rationalization (the paper's ablation)")
    p.add_argument("--continue-training", dest="restart", action="store_false",
                   help="fine-tune from M(n-1) instead of restarting from M0 each iteration")
    p.add_argument("--star-steps", type=positive(int),
                   help="fine-tuning steps of the first STaR iteration")
    p.add_argument("--step-growth", type=positive(float), default=1.2,
                   help="steps multiply by this every iteration (the paper: +20%%)")
    p.add_argument("--direct-baseline", action="store_true",
                   help="also train the direct-answer baseline (no rationales, same steps)")
    # V-STaR
    p.add_argument("--beta", type=positive(float), default=0.1,
                   help="DPO's beta (the DPO paper's default 0.1; V-STaR gives none)")
    p.add_argument("--verifier-steps", type=positive(int), help="training steps of each verifier")
    p.add_argument("--verifier-lr", type=positive(float), default=1e-4,
                   help="learning rate of the verifiers")
    p.add_argument("--eval-samples", type=positive(int),
                   help="samples per held-out problem for pass@k, best-of-k, majority@k "
                        "(a power of 2)")
    # search (flags of search.py only: keep them in this group)
    p.add_argument("--budgets", default=None,
                   help="search: budgets N, e.g. 1,2,4,8,16 (samples of best-of-N and the "
                        "votes, beams of beam search, simulations of MCTS)")
    p.add_argument("--beam-width", type=positive(int), default=4,
                   help="search: M, each of the N/M surviving beams is repeated M times")
    p.add_argument("--mcts-children", type=positive(int), default=4,
                   help="search: steps sampled when MCTS expands a node (duplicates merged)")
    p.add_argument("--mcts-c", type=float, default=1.0,
                   help="search: UCT's exploration constant c")
    p.add_argument("--rollouts", type=positive(int), default=None,
                   help="search: Math-Shepherd rollouts per step prefix (the PRM's labels)")
    # --- end of search flags
    # Quiet-STaR (flags of quiet_star.py only: keep them in this group)
    p.add_argument("--base-steps", type=positive(int), default=None,
                   help="Quiet-STaR: training steps of the base language model (from scratch)")
    p.add_argument("--continue-lr", type=positive(float), default=None,
                   help="Quiet-STaR: peak learning rate after the base (both arms)")
    p.add_argument("--seq-len", type=positive(int), default=None,
                   help="Quiet-STaR: tokens per training sequence (whole lines, padded)")
    p.add_argument("--thought-len", type=non_negative_int, default=None,
                   help="Quiet-STaR: sampled tokens per thought, between start and end tokens")
    p.add_argument("--n-true", type=positive(int), default=None,
                   help="Quiet-STaR: true tokens teacher-forced after a thought (reward, loss)")
    p.add_argument("--n-thoughts", type=positive(int), default=None,
                   help="Quiet-STaR: thoughts sampled per position (the reward's baseline)")
    p.add_argument("--think-stride", type=positive(int), default=None,
                   help="Quiet-STaR: think at every k-th position in training (1: every token)")
    p.add_argument("--thought-temperature", type=positive(float), default=1.0,
                   help="Quiet-STaR: sampling temperature of training thoughts")
    p.add_argument("--base-weight", type=float, default=0.5,
                   help="Quiet-STaR: weight of the base next-token NLL (the code: 0.5)")
    p.add_argument("--mixed-weight", type=float, default=0.5,
                   help="Quiet-STaR: weight of the mixed NLL over the n_true tokens (0.5)")
    p.add_argument("--reinforce-weight", type=float, default=1.0,
                   help="Quiet-STaR: weight of REINFORCE on the thought tokens")
    p.add_argument("--meta-lr-mult", type=positive(float), default=100.0,
                   help="Quiet-STaR: start/end-of-thought embeddings learn this much faster")
    p.add_argument("--eval-every", type=positive(int), default=None,
                   help="Quiet-STaR: steps between evaluations (the metrics rows)")
    # --- end of Quiet-STaR flags
    return p


def parse_difficulties(text, task, flag):
    """'1-5' or '1,2,4' -> a tuple of difficulties the task has."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            values = tuple(range(lo, hi + 1))
        else:
            values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    valid = task.difficulties
    if not values or any(v not in valid for v in values):
        raise ValueError(f"{flag} {text!r} is not valid for {task.name}: "
                         f"choose within {min(valid)}-{max(valid)}, e.g. 1-3 or 1,3")
    return values


def resolve(args, parser):
    """Fill preset defaults, check what argparse cannot, and build the data."""
    vstar_run = args.method == "vstar"
    method_defaults = dict(task=DEFAULT_TASK[args.method], samples=8 if vstar_run else 1,
                           temperature=0.7 if vstar_run else 0.0)
    if vstar_run:
        method_defaults["iterations"] = 2 if args.preset == "tiny" else 3  # the paper: T = 3
        # V-STaR's SFT set is a whole training set with gold solutions, not STaR's small P:
        # with P = 300 the tiny generator memorised it (4% greedy on held-out expressions)
        method_defaults["n_train"] = 2000
    # a method's own run sizes: module-level DEFAULTS = {preset: {flag: value}} (e.g. search.py)
    for k, v in getattr(METHODS[args.method], "DEFAULTS", {}).get(args.preset, {}).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k, v in {**RUN_DEFAULTS[args.preset], **method_defaults}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.method == "sft":
        args.iterations = 0
    if args.eval_samples & (args.eval_samples - 1):
        parser.error(f"argument --eval-samples: {args.eval_samples} is not a power of 2")
    if args.temperature < 0:
        parser.error(f"argument --temperature: {args.temperature} must be 0 or more")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        parser.error(f"argument --checkpoint: no file at {args.checkpoint!r}")
    if args.device == "auto":
        args.device = autodetect_device()
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda is not available here; choose auto or cpu")
    elif args.device == "mps" and not torch.backends.mps.is_available():
        parser.error("argument --device: mps is not available here; choose auto or cpu")
    task = get_task(args.task)
    every = f"{min(task.difficulties)}-{max(task.difficulties)}"  # a new task's default
    train_d, test_d = TASK_DEFAULTS.get(args.task, {}).get(
        "gpu" if args.preset == "gpu" else "cpu", (every, every))
    try:
        args.train_difficulty = parse_difficulties(args.train_difficulty or train_d, task,
                                                   "--train-difficulty")
        args.test_difficulty = parse_difficulties(args.test_difficulty or test_d, task,
                                                  "--test-difficulty")
    except ValueError as e:
        parser.error(str(e))
    if args.out is None:
        suffix = "" if args.rationalize or args.method == "sft" else "-norat"
        args.out = os.path.join("out", f"{args.method}-{args.task}{suffix}")
    return task


def build_data(task, args):
    """Test set first; P and D are drawn so that no test question appears in them."""
    test = sample_problems(task, args.n_test, args.test_difficulty, seed=args.seed * 3 + 1)
    held_out = frozenset(p.question for p in test)
    P = sample_problems(task, args.n_train, args.train_difficulty, seed=args.seed * 3 + 2,
                        exclude=held_out)
    D = sample_problems(task, args.n_unlabeled, args.train_difficulty, seed=args.seed * 3 + 3,
                        exclude=held_out)
    return P, D, test


def block_size_for(task, problems, preset_size):
    """A block that holds the longest hinted prompt plus a wordy completion, in 64s."""
    longest = max(len(encode(task.prompt(p, hint=True) + task.gold_completion(p)))
                  for p in problems)
    need = int(longest * 1.25) + 16
    return max(preset_size, -(-need // 64) * 64)


def init_distributed(args, parser):
    """torchrun --nproc_per_node=N train.py ...: join the process group torchrun set up (one
    process per GPU, nccl; or per CPU slot, gloo). Only rank 0 prints, shows bars, writes files."""
    import torch.distributed as dist
    if args.method in ("search", "quiet_star"):
        parser.error(f"argument --method: {args.method} does not split its work across "
                     f"processes yet; start it with python, not torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.device.startswith("cuda"):
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(args.device)
    dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
    if args.batch_size < dist.get_world_size():
        parser.error(f"argument --batch-size: {args.batch_size} is fewer than the "
                     f"{dist.get_world_size()} processes that share each batch")
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # (progress bars are off: see the imports)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    task = resolve(args, parser)
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        init_distributed(args, parser)
    P, D, test = build_data(task, args)
    cfg = get_config(args.preset, block_size=block_size_for(
        task, P + D + test, PRESETS[args.preset].block_size))

    # a folder that holds another run's results is never mixed with this one's
    os.makedirs(args.out, exist_ok=True)
    config = dict(vars(args))
    config["model"] = asdict(cfg)
    cfg_path = os.path.join(args.out, "config.json")
    if os.path.exists(cfg_path):
        old = json.load(open(cfg_path))
        # settings that only add rows (more iterations, the baseline) or move the run may change
        free = ("iterations", "device", "direct_baseline")
        same = {k: v for k, v in old.items() if k not in free} == \
            {k: v for k, v in json.loads(json.dumps(config)).items() if k not in free}
        if not same:
            parser.error(f"argument --out: {args.out!r} holds a run with other settings; "
                         f"choose another --out or delete it")
    star.write_atomic(cfg_path, json.dumps(config, indent=2))

    print(f"{args.method} on {args.task}: P={len(P)} D={len(D)} test={len(test)} "
          f"| model {args.preset} ({cfg.n_layer}x{cfg.n_embd}, block {cfg.block_size}) "
          f"on {args.device} x {rank_world()[1]} | out {args.out}")

    def new_model():
        if args.checkpoint:
            return load_checkpoint(args.checkpoint, args.device)[0]
        return GPT(cfg).to(args.device)

    t0 = time.time()
    METHODS[args.method].run(args, task, P, D, test, args.out, args.device, new_model)
    if rank_world()[1] > 1:  # torchrun: the work is done; rank 0 alone writes the report
        main_process = is_main()
        torch.distributed.destroy_process_group()
        if not main_process:
            return
    rows = star.read_jsonl(os.path.join(args.out, "metrics.jsonl"))
    table = METHODS[args.method].report(args, rows)
    star.write_atomic(os.path.join(args.out, "summary.md"),
                      f"# {args.method} on {args.task}\n\n{table}\n")
    plots = ", ".join(sorted(f for f in os.listdir(args.out) if f.endswith(".png")))
    print(f"\n{table}\n\ndone in {time.time() - t0:.0f}s; results in {args.out}/ "
          f"(summary.md, metrics.jsonl, {plots})")


if __name__ == "__main__":
    main()
