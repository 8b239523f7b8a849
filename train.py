"""
The one command line:
  python train.py --method {sft,star,vstar,search,quiet_star,sos,rl,score} [flags]

  python train.py --method sft --task addition     # the model trained on worked examples P
  python train.py --method star                    # STaR on addition (the README's main command)
  python train.py --method star --no-rationalize   # the ablation of the paper's Figure 4
  python train.py --method vstar                   # V-STaR: generator, DPO verifier, best-of-k
  python train.py --method search                  # test-time search at equal compute
  python train.py --method quiet_star              # Quiet-STaR on arithmetic text
  python train.py --method sos                     # Stream of Search: learning to search
  python train.py --method rl                      # policy gradient beside STaR, same M0
  python train.py --method score                   # SCoRe: learning to correct itself
  python train.py --method star --preset gpu       # the GPU experiment (one H100)
  python train.py --method vstar --help            # vstar's flags and the values it uses

Each run writes out/<method>-<task>/: config.json (every resolved setting), metrics.jsonl,
checkpoints, samples, plots and summary.md. Started again on the same folder, a run continues
after its last committed stage. This file only parses flags, builds the data and writes the
report; the methods live in their own files, and so do their flags: each method file has a
FLAGS table, one row per flag (its type, its value per preset, its help), and train.py adds
the flags every method takes; resolve() below merges the given flags over the method's values.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

if int(os.environ.get("RANK", "0")) > 0:  # torchrun's other processes: no progress bars
    os.environ["TQDM_DISABLE"] = "1"  # (tqdm reads it when it is first imported)
import torch

import quiet_star
import rl
import score
import search
import sos
import star
import vstar
from common import (autodetect_device, is_main, load_checkpoint, non_negative, presets, rank_world,
                    read_jsonl, seed_for, write_atomic)
from model import GPT, PRESETS, get_config
from tasks import (TASKS, Countdown, distinct_problems, encode, get_task, held_out, reachable,
                   sample_problems)
from tasks.countdown import NUMBERS, TARGETS, parse_numbers, parse_range, read_problems

METHODS = {  # name: (its file, its flags beyond train.py's own)
    "sft": (star, star.SFT_FLAGS),  # STaR's iteration 0 alone: M0 trained on P
    "star": (star, star.FLAGS),
    "vstar": (vstar, vstar.FLAGS),
    "search": (search, search.FLAGS),
    "quiet_star": (quiet_star, quiet_star.FLAGS),
    "sos": (sos, sos.FLAGS),
    "rl": (rl, rl.FLAGS),
    "score": (score, score.FLAGS),
}
# {method: {preset: {flag: value}}}, each method's values at each preset
METHOD_DEFAULTS = {name: presets(table) for name, (_, table) in METHODS.items()}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad input: one line naming the bad value and the valid choices, exit code 2."""
        sys.stderr.write(f"train.py: error: {message}\n")
        sys.exit(2)


def arg(*names, **kw):
    """One of train.py's own flags: (args.<dest> it sets, its names, add_argument's keywords)."""
    return kw.get("dest", names[-1][2:].replace("-", "_")), names, kw


# The flags every method takes. Each defaults to None ("not given") unless it says otherwise:
# resolve() fills it from the method's table.
COMMON_FLAGS = [
    arg("--method", choices=sorted(METHODS),
        help="sft: train on the worked examples P only; star: STaR on top of it "
             "(the default); vstar: V-STaR (generator iterations, DPO verifier, "
             "best-of-k); search: test-time search at equal compute; quiet_star: "
             "Quiet-STaR; sos: Stream of Search; rl: policy gradient with the checker "
             "as the reward, beside STaR; score: SCoRe, two attempts, learning to correct "
             "itself"),
    arg("--task", default=None, choices=sorted(TASKS),
        help="task family (each method has its own)"),
    arg("--preset", default="tiny", choices=list(PRESETS),
        help="model and run size: tiny (CPU, minutes), small, gpu (one H100)"),
    arg("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
        help="auto picks cuda, then mps, then cpu"),
    arg("--seed", type=non_negative(int), default=0, help="seed of data and sampling"),
    arg("--out", default=None, help="output folder, out/<method>-<task> if not given"),
    arg("--train-difficulty", default=None,
        help="difficulties of the training problems, e.g. 1-5 or 1,2,4 (addition: digits)"),
    arg("--test-difficulty", default=None, help="difficulties of the test set"),
    arg("-h", "--help", action="store_const", const=True,
        help="show the flags of --method M and the values it uses, then exit"),
]
# Countdown's problems as others set them (README: "Countdown on the public settings")
COUNTDOWN_FLAGS = [
    arg("--numbers", help="countdown: the numbers drawn, lo-hi, and +a,b,.. for large ones, one "
                          "of which replaces a number in 1 problem of 4 (e.g. 1-100)"),
    arg("--targets", help="countdown: the targets allowed, lo-hi (e.g. 1-100)"),
    arg("--test-file", help='countdown: the test set read from a JSON-lines file, one problem a '
                            'line: {"nums": [30, 100, 93], "target": 23} or {"input": '
                            '"30,100,93", "output": "23"}; no training problem is one of them'),
    arg("--skip-unsolvable", action="store_const", const=True,
        help="leave out (and count) a test-file problem the rules here cannot solve, instead of "
             "stopping at it"),
]
COUNTDOWN = tuple(dest for dest, _, _ in COUNTDOWN_FLAGS)
COMMON = tuple(dest for dest, _, _ in COMMON_FLAGS if dest != "help") + COUNTDOWN
# every method's own flags, each once (the same flag means the same in every table it is in)
METHOD_FLAGS = {}
for _, table in METHODS.values():
    for dest, names, kw, _ in table:
        if dest not in COMMON:
            METHOD_FLAGS.setdefault(dest, (dest, names, kw))
FLAG_OF = {dest: names[-1] for dest, names, _ in
           COMMON_FLAGS + COUNTDOWN_FLAGS + list(METHOD_FLAGS.values())}


def build_parser(groups, method=None, preset=None, epilog=None):
    """A parser of the flags in groups ({header: [(dest, names, kw)]}); with a method, each
    flag's help ends in the value the method uses at this preset."""
    p = Parser(description="Self-taught reasoning from scratch: one command for every method.",
               epilog=epilog, add_help=False)
    for header, rows in groups.items():
        g = p.add_argument_group(header)
        for dest, names, kw in rows:
            if method is not None and dest != "help":
                value = shown_default(dest, kw, method, preset)
                kw = dict(kw, help=f"{kw['help']} (default for {method}, preset {preset}: "
                                   f"{value})")
            g.add_argument(*names, **kw)
    return p


def get_parser(method=None):
    """The parser of every flag of every method, each flag as the method's own table types it
    (with no method, as the first table that has it): resolve() then refuses the flags the
    method's table does not list."""
    own = {} if method is None else {dest: (dest, names, kw) for dest, names, kw, _ in
                                     METHODS[method][1] if dest not in COMMON}
    return build_parser({"every method": COMMON_FLAGS, "countdown's problems": COUNTDOWN_FLAGS,
                         "the methods' own (python train.py --method M --help)":
                         list({**METHOD_FLAGS, **own}.values())})


def help_parser(method, preset):
    """What --help shows: with --method M, the common flags and M's (its help, from its table),
    with the values M uses at this preset; without, the common flags and the methods to ask
    about."""
    if method is None:
        return build_parser({"every method": COMMON_FLAGS, "countdown's problems": COUNTDOWN_FLAGS},
                            epilog="methods: " + ", ".join(sorted(METHODS)) +
                            ". Add --method M for M's flags and the values it uses "
                            "(and --preset P for another preset's).")
    own = [(dest, names, kw) for dest, names, kw, _ in METHODS[method][1] if dest not in COMMON]
    return build_parser({"every method": COMMON_FLAGS, "countdown's problems": COUNTDOWN_FLAGS,
                         f"{method} ({METHODS[method][0].__name__}.py)": own}, method, preset)


def shown_default(dest, kw, method, preset):
    """The value resolve() would give args.<dest> for this method and preset, for --help."""
    table = METHOD_DEFAULTS[method][preset]
    task = get_task(table["task"])
    train_d, test_d = default_difficulties(task, preset)
    resolved = {"method": method, "preset": preset, "train_difficulty": train_d,
                "test_difficulty": test_d, "out": os.path.join("out", f"{method}-{task.name}")}
    if dest in COUNTDOWN and task.name != "countdown":
        return f"- (countdown's; the task is {task.name})"
    resolved.update(numbers=NUMBERS, targets=TARGETS, test_file="none: a test set is drawn")
    value = {**resolved, **table}.get(dest, kw.get("default"))
    if kw.get("action") == "store_const":  # a switch: on when the method sets it
        return "on" if value == kw["const"] else "off"
    return value


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


def default_difficulties(task, preset):
    """The task's own (train, test) difficulties at this preset; all of them if it names none."""
    every = f"{min(task.difficulties)}-{max(task.difficulties)}"
    return task.default_difficulties["gpu" if preset == "gpu" else "cpu"] or (every, every)


def resolve(args, parser):
    """Merge the flags over the method's table (the one place where defaults meet flags), check
    what argparse cannot, and return the task. A flag the method does not use is refused."""
    # 1) refuse a flag the method does not take, then fill the unset ones from its table
    args.method = args.method or "star"
    table = METHOD_DEFAULTS[args.method][args.preset]
    if args.test_file is not None:  # the file is the test set: its size and difficulties too
        for name in ("n_test", "test_difficulty"):
            if getattr(args, name) is not None:
                parser.error(f"argument {FLAG_OF[name]}: --test-file {args.test_file} sets the "
                             "test set; give one or the other")
    for name, value in vars(args).items():
        if value is not None and name not in COMMON and name not in table:
            parser.error(f"argument {FLAG_OF[name]}: --method {args.method} does not use it; "
                         "its own flags: " + " ".join(FLAG_OF[k] for k in table if k not in COMMON))
    chosen = {name for name, value in vars(args).items() if value is not None}
    for name, value in table.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    # 2) what argparse cannot check: values that depend on each other, files, devices
    if getattr(args, "eval_samples", None) and args.eval_samples & (args.eval_samples - 1):
        parser.error(f"argument --eval-samples: {args.eval_samples} is not a power of 2")
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
    # 3) the task (countdown: drawn as its flags say), its difficulties and the output folder
    task = countdown_setting(args, parser) if args.task == "countdown" else get_task(args.task)
    taken = getattr(METHODS[args.method][0], "TASK_CHOICES", TASKS)
    if args.task not in taken:
        parser.error(f"argument --task: --method {args.method} does not run {args.task}; "
                     f"choose {', '.join(taken)}")
    calculator = args.calculator or "off"  # (None: the method has no --calculator)
    if calculator not in ("off", *task.calculators) and "calculator" not in chosen:
        args.calculator = "off"  # the method's default calculator, on a task without it
    elif calculator not in ("off", *task.calculators):
        parser.error(f"argument --calculator: {args.task} has no calculator {calculator!r}; "
                     "choose " + ", ".join(("off", *task.calculators)))
    given = [FLAG_OF[name] for name in COUNTDOWN if getattr(args, name) is not None]
    if given and args.task != "countdown":
        parser.error(f"argument {given[0]}: it sets countdown's problems, and the task is "
                     f"{args.task}; add --task countdown")
    train_d, test_d = default_difficulties(task, args.preset)
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


def countdown_setting(args, parser):
    """The countdown task as --numbers and --targets draw it (the registry's if neither is
    given); --test-file must name a file, and --skip-unsolvable needs one."""
    try:
        parse_numbers(args.numbers or NUMBERS)
    except ValueError as e:
        parser.error(f"argument --numbers: {e}")
    try:
        parse_range(args.targets or TARGETS)
    except ValueError as e:
        parser.error(f"argument --targets: {e}")
    if args.test_file is not None and not os.path.isfile(args.test_file):
        parser.error(f"argument --test-file: no file at {args.test_file!r}")
    if args.skip_unsolvable and args.test_file is None:
        parser.error("argument --skip-unsolvable: it leaves out test-file problems; add "
                     "--test-file PATH")
    if args.numbers is None and args.targets is None:
        return get_task("countdown")
    return Countdown(numbers=args.numbers or NUMBERS, targets=args.targets or TARGETS)


def build_data(task, args):
    """Test set first, drawn or read from --test-file, no problem twice (by task.key: countdown's
    numbers in any order are one problem); P and D are drawn without any test problem. Returns
    (P, D, test, where the test set comes from). A method that makes its own training data
    (Quiet-STaR's text) gets no P and D, but what it would draw is tried here: a setting that
    cannot be drawn, or a problem the method cannot take (its check_data), ends the run now."""
    if args.test_file is not None:
        test, source = read_test_file(task, args)
    else:
        test = sample_problems(task, args.n_test, args.test_difficulty,
                               seed=seed_for(args.seed, "test"), distinct=True)
        report_short_test(task, test, args.n_test, args.test_difficulty)
        source = f"test set: {len(test)} problems drawn with seed {args.seed}"
    keys = held_out(task, test)
    if args.n_train is None:
        tried = sample_problems(task, 16, args.train_difficulty, seed_for(args.seed, "try"),
                                exclude=keys)
        getattr(METHODS[args.method][0], "check_data", lambda *a: None)(args, task, test + tried)
        return None, None, test, source
    P = sample_problems(task, args.n_train, args.train_difficulty, seed=seed_for(args.seed, "P"),
                        exclude=keys)
    D = []  # --method sft has no D
    if args.n_unlabeled:
        D = sample_problems(task, args.n_unlabeled, args.train_difficulty,
                            seed=seed_for(args.seed, "D"), exclude=keys)
    return P, D, test, source


def read_test_file(task, args):
    """The test set of --test-file: its problems the rules here can solve, each once (the first
    line of a key). An unsolvable one stops the run with its line unless --skip-unsolvable
    (then it is counted). Sets args.n_test and args.test_difficulty to the file's. Returns
    (problems, a sentence saying what was read)."""
    try:
        rows = read_problems(task, args.test_file)
    except (OSError, ValueError) as e:  # (a file that is not text is a UnicodeDecodeError)
        raise ValueError(f"argument --test-file: {e}") from None
    if not rows:
        raise ValueError(f"argument --test-file: {args.test_file} holds no problem")
    unsolvable = [(n, p) for n, p in rows if not reachable(*p.data)]
    if unsolvable and not args.skip_unsolvable:
        n, p = unsolvable[0]
        raise ValueError(f"argument --test-file: {args.test_file} line {n}: {p.question} cannot "
                         "be solved with each number once, + - * and exact division, and no "
                         f"negative or fraction in between ({len(unsolvable)} of its {len(rows)} "
                         "problems cannot; --skip-unsolvable leaves them out)")
    test, seen, bad = [], set(), {n for n, _ in unsolvable}
    for n, p in rows:
        if n not in bad and task.key(p) not in seen:
            seen.add(task.key(p))
            test.append(p)
    if not test:
        raise ValueError(f"argument --test-file: every problem in {args.test_file} is unsolvable "
                         "here")
    args.n_test, args.test_difficulty = len(test), tuple(sorted({p.difficulty for p in test}))
    source = (f"test set: {len(test)} problems read from {args.test_file} ({len(rows)} read, "
              f"{len(bad)} left out as unsolvable here, {len(rows) - len(bad) - len(test)} as "
              "repeats)")
    outside = sum(not task.could_draw(p) for p in test)
    if outside:
        source += (f"; {outside} of them are outside the training draw (--numbers "
                   f"{task.setting['numbers']} --targets {task.setting['targets']})")
    return test, source


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


def write_config(args, cfg, parser):
    """config.json: every resolved setting. A folder that holds another run's results is never
    mixed with this one's: only settings that add rows or move the run may change."""
    os.makedirs(args.out, exist_ok=True)
    used = METHOD_DEFAULTS[args.method][args.preset]
    config = {k: v for k, v in vars(args).items() if k in COMMON or k in used}
    config["model"] = asdict(cfg)
    if args.test_file is not None:  # the same file name may come to hold other problems
        config["test_file_sha256"] = hashlib.sha256(open(args.test_file, "rb").read()).hexdigest()
    cfg_path = os.path.join(args.out, "config.json")
    if os.path.exists(cfg_path):
        old = json.load(open(cfg_path))
        free = ("iterations", "device", "direct_baseline")  # more rows, or another machine
        # (a flag unset, None, is the same as one a folder written before it existed lacks)
        same = {k: v for k, v in old.items() if k not in free and v is not None} == \
            {k: v for k, v in json.loads(json.dumps(config)).items()
             if k not in free and v is not None}
        if not same:
            parser.error(f"argument --out: {args.out!r} holds a run with other settings; "
                         f"choose another --out or delete it")
    write_atomic(cfg_path, json.dumps(config, indent=2))


def write_report(args, t0, source):
    """summary.md: where the test set comes from and the method's table of its metrics rows,
    also printed."""
    rows = read_jsonl(os.path.join(args.out, "metrics.jsonl"))
    table = f"{source}\n\n{METHODS[args.method][0].report(args, rows)}"
    write_atomic(os.path.join(args.out, "summary.md"),
                 f"# {args.method} on {args.task}\n\n{table}\n")
    plots = ", ".join(sorted(f for f in os.listdir(args.out) if f.endswith(".png")))
    print(f"\n{table}\n\ndone in {time.time() - t0:.0f}s; results in {args.out}/ "
          f"(summary.md, metrics.jsonl, {plots})")


def main(argv=None):
    """python train.py [flags]: one run of one method, its outputs in --out."""
    # 1) the flags, resolved over the method's table (--help: shown, then exit)
    first = Parser(add_help=False)  # --method first: each flag is then typed as it uses it
    first.add_argument("--method", choices=sorted(METHODS))
    parser = get_parser(first.parse_known_args(argv)[0].method)
    args = parser.parse_args(argv)
    if args.help:
        help_parser(args.method, args.preset).print_help()
        parser.exit()
    task = resolve(args, parser)
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        init_distributed(args, parser)
    # 2) the data, and a model config whose block holds its longest prompt and completion
    try:
        P, D, test, source = build_data(task, args)
    except ValueError as e:  # a test file that is not one, or a draw that cannot be made
        parser.error(str(e))
    cfg = get_config(args.preset)
    if P is not None:  # a block that holds every prompt and completion of this data
        module = METHODS[args.method][0]  # (a method that writes other completions names them)
        writes = getattr(module, "completion_task", lambda args, task: task)(args, task)
        cfg = get_config(args.preset, block_size=block_size_for(writes, P + D + test,
                                                                cfg.block_size))
    write_config(args, cfg, parser)
    data = "" if P is None else f"P={len(P)} D={len(D)} test={len(test)} | "
    print(f"{args.method} on {args.task}: {data}model {args.preset} ({cfg.n_layer}x{cfg.n_embd}, "
          f"block {cfg.block_size}) on {args.device} x {rank_world()[1]} | out {args.out}\n"
          f"{source}")

    def new_model():
        if args.checkpoint:
            return load_checkpoint(args.checkpoint, args.device)[0]
        return GPT(cfg).to(args.device)

    # 3) the method's run (it resumes after its last commit), then the report
    t0 = time.time()
    METHODS[args.method][0].run(args, task, P, D, test, args.out, args.device, new_model)
    if rank_world()[1] > 1:  # torchrun: the work is done; rank 0 alone writes the report
        main_process = is_main()
        torch.distributed.destroy_process_group()
        if not main_process:
            return
    write_report(args, t0, source)


if __name__ == "__main__":
    main()
