"""
The one command line: python train.py --method {sft,star,vstar,search,quiet_star,sos} [flags]

  python train.py --method sft --task addition     # the model trained on worked examples P
  python train.py --method star                    # STaR on addition (the README's main command)
  python train.py --method star --no-rationalize   # the ablation of the paper's Figure 4
  python train.py --method vstar                   # V-STaR: generator, DPO verifier, best-of-k
  python train.py --method search                  # test-time search at equal compute
  python train.py --method quiet_star              # Quiet-STaR on arithmetic text
  python train.py --method sos                     # Stream of Search: learning to search
  python train.py --method star --preset gpu       # the GPU experiment (one H100)

Each run writes out/<method>-<task>/: config.json (every resolved setting), metrics.jsonl,
checkpoints, samples, plots and summary.md. Started again on the same folder, a run continues
after its last committed stage. This file only parses flags, builds the data and writes the
report; the methods live in their own files, and so do their defaults: each method file has a
DEFAULTS table keyed by preset, merged under the flags in resolve() below.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

if int(os.environ.get("RANK", "0")) > 0:  # torchrun's other processes: no progress bars
    os.environ["TQDM_DISABLE"] = "1"  # (tqdm reads it when it is first imported)
import torch

import quiet_star
import search
import star
import vstar
from model import (GPT, PRESETS, autodetect_device, get_config, is_main, load_checkpoint,
                   rank_world, read_jsonl, seed_for, write_atomic)
from tasks import TASKS, distinct_problems, encode, get_task, held_out, sample_problems

# Stream of Search extends STaR, so it lives in star.py beside it
METHODS = {"sft": star, "star": star, "vstar": vstar, "search": search, "quiet_star": quiet_star,
           "sos": SimpleNamespace(run=star.run_sos, report=star.report_sos)}
# each method's settings per preset: {preset: {flag: value}}, in the method's own file
DEFAULTS = {"sft": star.SFT_DEFAULTS, "star": star.DEFAULTS, "vstar": vstar.DEFAULTS,
            "search": search.DEFAULTS, "quiet_star": quiet_star.DEFAULTS,
            "sos": star.SOS_DEFAULTS}
# flags every method takes; each method's table lists the others it takes
COMMON = ("method", "preset", "device", "seed", "out", "task", "train_difficulty",
          "test_difficulty")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad input: one line naming the bad value and the valid choices, exit code 2."""
        sys.stderr.write(f"train.py: error: {message}\n")
        sys.exit(2)


def checked(cast, ok, rule):
    """An argparse type: text -> cast(text), refused with `rule` unless ok(value)."""
    def check(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} {rule}")
        return value
    return check


def positive(cast):
    return checked(cast, lambda v: v > 0, "must be greater than 0")


def non_negative(cast):
    return checked(cast, lambda v: v >= 0, "must be 0 or more")


non_negative_int = non_negative(int)
fraction = checked(float, lambda v: 0 <= v <= 1, "is not between 0 and 1")


def get_parser():
    """Every flag defaults to None ("not given"): resolve() fills it from the method's table, and
    refuses a given flag that the method does not use."""
    p = Parser(description="Self-taught reasoning from scratch: one command for every method. "
                           "Defaults per method and preset are in each method's DEFAULTS.")
    # what to run (every method)
    p.add_argument("--method", default="star", choices=sorted(METHODS),
                   help="sft: train on the worked examples P only; star: STaR on top of it; "
                        "vstar: V-STaR (generator iterations, DPO verifier, best-of-k); "
                        "search: test-time search at equal compute; quiet_star: Quiet-STaR")
    p.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="task family (default: the method's, e.g. addition for star)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="model and run size: tiny (CPU, minutes), small, gpu (one H100)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of data and sampling")
    p.add_argument("--out", default=None, help="output folder (default out/<method>-<task>)")
    p.add_argument("--train-difficulty", default=None,
                   help="difficulties of the training problems, e.g. 1-5 or 1,2,4 "
                        "(addition: digits)")
    p.add_argument("--test-difficulty", default=None, help="difficulties of the test set")
    p.add_argument("--checkpoint", default=None,
                   help="start from this model instead of training M0 on P")
    p.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the training forward")
    # data
    p.add_argument("--n-train", type=positive(int), help="size of P, problems with gold rationales")
    p.add_argument("--n-unlabeled", type=positive(int),
                   help="size of D, problems with answers but no rationales")
    p.add_argument("--n-test", type=positive(int), help="held-out test problems")
    # supervised training
    p.add_argument("--steps", type=positive(int),
                   help="supervised fine-tuning steps on P (M0; each V-STaR generator)")
    p.add_argument("--batch-size", type=positive(int), help="examples per training step")
    p.add_argument("--lr", type=positive(float), help="peak learning rate")
    p.add_argument("--sample-batch-size", type=positive(int), help="prompts per sampling batch")
    # STaR
    p.add_argument("--calculator", choices=["off", "result", "judge"],
                   help="sos: the program writes each a op b= result (result), also a trace "
                        "step's numbers left and a leaf's verdict (judge), or nothing (off)")
    p.add_argument("--iterations", type=non_negative_int,
                   help="STaR or V-STaR iterations after M0")
    p.add_argument("--samples", type=positive(int),
                   help="samples per problem per iteration (STaR: 1, as the paper; V-STaR: 8)")
    p.add_argument("--temperature", type=float,
                   help="sampling temperature; 0 is greedy (STaR's default, as the paper)")
    p.add_argument("--no-rationalize", dest="rationalize", action="store_const", const=False,
                   help="STaR: skip rationalization (the paper's ablation)")
    p.add_argument("--continue-training", dest="restart", action="store_const", const=False,
                   help="STaR: fine-tune from M(n-1) instead of restarting from M0")
    p.add_argument("--star-steps", type=positive(int),
                   help="STaR: fine-tuning steps of the first iteration")
    p.add_argument("--step-growth", type=positive(float),
                   help="STaR: steps multiply by this every iteration (the paper: 1.2)")
    p.add_argument("--direct-baseline", action="store_const", const=True,
                   help="STaR: also train the direct-answer baseline (no rationales, same steps)")
    # verifiers (V-STaR, search)
    p.add_argument("--beta", type=positive(float),
                   help="DPO's beta (the DPO paper's default 0.1; V-STaR gives none)")
    p.add_argument("--dpo-nll", type=non_negative(float),
                   help="V-STaR: weight of the right solutions' mean token NLL added to DPO's "
                        "loss (RPO); 0 is the paper's plain DPO")
    p.add_argument("--verifier-steps", type=positive(int), help="training steps of each verifier")
    p.add_argument("--verifier-lr", type=positive(float), help="learning rate of the verifiers")
    p.add_argument("--eval-samples", type=positive(int),
                   help="samples per held-out problem for pass@k, best-of-k, majority@k "
                        "(a power of 2)")
    # search
    p.add_argument("--budgets", default=None,
                   help="search: budgets N, e.g. 1,2,4,8,16 (samples of best-of-N and the "
                        "votes, beams of beam search, simulations of MCTS)")
    p.add_argument("--beam-width", type=positive(int),
                   help="search: M, each of the N/M surviving beams is repeated M times")
    p.add_argument("--mcts-children", type=positive(int),
                   help="search: steps sampled when MCTS expands a node (duplicates merged)")
    p.add_argument("--mcts-c", type=float, help="search: UCT's exploration constant c")
    p.add_argument("--rollouts", type=positive(int),
                   help="search: Math-Shepherd rollouts per step prefix (the PRM's labels)")
    # Quiet-STaR
    p.add_argument("--base-steps", type=positive(int),
                   help="Quiet-STaR: training steps of the base language model (from scratch)")
    p.add_argument("--think-steps", type=positive(int),
                   help="Quiet-STaR: training steps after the base (both arms take as many)")
    p.add_argument("--continue-lr", type=positive(float),
                   help="Quiet-STaR: peak learning rate after the base (both arms)")
    p.add_argument("--seq-len", type=positive(int),
                   help="Quiet-STaR: tokens per training sequence (whole lines, padded)")
    p.add_argument("--thought-len", type=non_negative_int,
                   help="Quiet-STaR: sampled tokens per thought, between start and end tokens")
    p.add_argument("--n-true", type=positive(int),
                   help="Quiet-STaR: true tokens teacher-forced after a thought (reward, loss)")
    p.add_argument("--n-thoughts", type=positive(int),
                   help="Quiet-STaR: thoughts sampled per position (the reward's baseline)")
    p.add_argument("--think-stride", type=positive(int),
                   help="Quiet-STaR: think at every k-th position in training (1: every token)")
    p.add_argument("--thought-temperature", type=positive(float),
                   help="Quiet-STaR: sampling temperature of training thoughts")
    p.add_argument("--base-weight", type=float,
                   help="Quiet-STaR: weight of the base next-token NLL (the code: 0.5)")
    p.add_argument("--mixed-weight", type=float,
                   help="Quiet-STaR: weight of the mixed NLL over the n_true tokens (0.5)")
    p.add_argument("--reinforce-weight", type=float,
                   help="Quiet-STaR: weight of REINFORCE on the thought tokens")
    p.add_argument("--meta-lr-mult", type=positive(float),
                   help="Quiet-STaR: start/end-of-thought embeddings learn this much faster")
    p.add_argument("--meta-max-change", type=positive(float),
                   help="Quiet-STaR: most a meta-token row moves per step, times the median "
                        "row norm (inf: unbounded, the official code)")
    p.add_argument("--meta-init", choices=["paren", "dash"],
                   help="Quiet-STaR: meta-tokens start as '(' and ')' or both as '-' (the paper)")
    p.add_argument("--mixing", choices=["tanh", "linear", "sigmoid"],
                   help="Quiet-STaR: the mixing weight's bound: tanh (-1..1), linear (none, the "
                        "official code), sigmoid (0..1)")
    p.add_argument("--head-lr-mult", type=positive(float),
                   help="Quiet-STaR: the mixing head learns this much faster than the model")
    p.add_argument("--worked-fraction", type=fraction,
                   help="Quiet-STaR: share of text lines that show their work (0: none)")
    p.add_argument("--eval-every", type=positive(int),
                   help="Quiet-STaR: steps between evaluations (the metrics rows)")
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


def flag(name):
    """The command-line flag that sets args.<name>."""
    return "--" + {"rationalize": "no-rationalize",
                   "restart": "continue-training"}.get(name, name).replace("_", "-")


def resolve(args, parser):
    """Merge the flags over the method's table (the one place where defaults meet flags), check
    what argparse cannot, and return the task. A flag the method does not use is refused."""
    table = DEFAULTS[args.method][args.preset]
    for name, value in vars(args).items():
        if value is not None and name not in COMMON and name not in table:
            parser.error(f"argument {flag(name)}: --method {args.method} does not use it; its "
                         "own flags: " + " ".join(flag(k) for k in table if k not in COMMON))
    for name, value in table.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if getattr(args, "eval_samples", None) and args.eval_samples & (args.eval_samples - 1):
        parser.error(f"argument --eval-samples: {args.eval_samples} is not a power of 2")
    if getattr(args, "worked_fraction", None) == 1:
        parser.error("argument --worked-fraction: 1 leaves no bare lines to measure; "
                     "choose 0 <= fraction < 1")
    if getattr(args, "temperature", None) is not None and args.temperature < 0:
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
    every = f"{min(task.difficulties)}-{max(task.difficulties)}"
    train_d, test_d = task.default_difficulties["gpu" if args.preset == "gpu" else "cpu"] or \
        (every, every)
    try:
        args.train_difficulty = parse_difficulties(args.train_difficulty or train_d, task,
                                                   "--train-difficulty")
        args.test_difficulty = parse_difficulties(args.test_difficulty or test_d, task,
                                                  "--test-difficulty")
    except ValueError as e:
        parser.error(str(e))
    if args.out is None:
        suffix = "-norat" if args.rationalize is False else ""
        args.out = os.path.join("out", f"{args.method}-{args.task}{suffix}")
    return task


def build_data(task, args):
    """Test set first, no problem twice (by task.key: countdown's numbers in any order are one
    problem); P and D are drawn without any test problem. A method that makes its own data
    (Quiet-STaR's text) gets none."""
    if args.n_train is None:
        return None, None, None
    test = sample_problems(task, args.n_test, args.test_difficulty,
                           seed=seed_for(args.seed, "test"), distinct=True)
    report_short_test(task, test, args.n_test, args.test_difficulty)
    keys = held_out(task, test)
    P = sample_problems(task, args.n_train, args.train_difficulty, seed=seed_for(args.seed, "P"),
                        exclude=keys)
    D = []  # --method sft has no D
    if args.n_unlabeled:
        D = sample_problems(task, args.n_unlabeled, args.train_difficulty,
                            seed=seed_for(args.seed, "D"), exclude=keys)
    return P, D, test


def report_short_test(task, test, n, difficulties):
    """Say which difficulties have fewer test problems than asked: a test set takes at most
    TEST_SHARE of a difficulty's distinct problems, the rest stay for training."""
    for d in dict.fromkeys(difficulties):
        asked = len(range(difficulties.index(d), n, len(difficulties)))
        got = sum(p.difficulty == d for p in test)
        if got < asked and is_main():
            print(f"test set: {got} problems of difficulty {d}, not {asked}: {task.name} has "
                  f"{distinct_problems(task, d)} distinct ones there, and the rest are "
                  "kept for training")


def block_size_for(task, problems, preset_size):
    """A block that holds the longest hinted prompt plus the longest completion the sampler
    allows at these problems' difficulties (star.completion_cap), in 64s."""
    need = max(len(encode(task.prompt(p, hint=True))) for p in problems) + \
        max(star.completion_cap(task, d) for d in {p.difficulty for p in problems})
    return max(preset_size, -(-need // 64) * 64)


def init_distributed(args, parser):
    """torchrun --nproc_per_node=N train.py ...: join the process group torchrun set up (one
    process per GPU, nccl; or per CPU slot, gloo). Only rank 0 prints, shows bars, writes files."""
    import torch.distributed as dist
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
    cfg = get_config(args.preset)
    if P is not None:  # a block that holds every prompt and completion of this data
        longest = star.sos_tasks(args)[1] if args.method == "sos" else task  # its traces
        cfg = get_config(args.preset, block_size=block_size_for(longest, P + D + test,
                                                                cfg.block_size))

    # a folder that holds another run's results is never mixed with this one's
    os.makedirs(args.out, exist_ok=True)
    used = DEFAULTS[args.method][args.preset]
    config = {k: v for k, v in vars(args).items() if k in COMMON or k in used}
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
    write_atomic(cfg_path, json.dumps(config, indent=2))

    data = "" if P is None else f"P={len(P)} D={len(D)} test={len(test)} | "
    print(f"{args.method} on {args.task}: {data}model {args.preset} ({cfg.n_layer}x{cfg.n_embd}, "
          f"block {cfg.block_size}) on {args.device} x {rank_world()[1]} | out {args.out}")

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
    rows = read_jsonl(os.path.join(args.out, "metrics.jsonl"))
    table = METHODS[args.method].report(args, rows)
    write_atomic(os.path.join(args.out, "summary.md"),
                      f"# {args.method} on {args.task}\n\n{table}\n")
    plots = ", ".join(sorted(f for f in os.listdir(args.out) if f.endswith(".png")))
    print(f"\n{table}\n\ndone in {time.time() - t0:.0f}s; results in {args.out}/ "
          f"(summary.md, metrics.jsonl, {plots})")


if __name__ == "__main__":
    main()
