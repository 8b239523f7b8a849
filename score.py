"""
Learning to correct itself over two attempts: SCoRe (Kumar et al. 2024, arXiv 2409.12917), beside
the baselines its paper measured it against, on countdown with the result calculator.

    Q: 7 3 5 T: 26          attempt 1 (y1), ended by the model
    7*3=21
    21+5=26
    A: 26
    Check and try again:    INSTRUCTION: the same line whether y1 was right or not
    7*3=21 ...              attempt 2 (y2), ended by the model; its answer is the one that counts

Why countdown with the calculator: the calculator writes every result, so whether attempt 1
reached the target is on the page, and a model can learn to keep a right path and to look for
another after a wrong one. (On addition a wrong sum looks like a right one.)

    M0 <- finetune(fresh, P)   each problem of P written twice, two of its solutions drawn at
                               random as y1 and y2: M0 knows the format, and its second attempt
                               is a fresh solve that ignores the first
    base      M0 prompted for a second attempt, untrained
    star_wr   M0's own two attempts on the problems of D; keep wrong->right; fine-tune y2 | x, y1
    star      the same with right->right kept too (STaR on correction traces)
    pair_sft  M0's wrong first attempts, each paired with a right attempt M0 wrote for the same
              problem (Welleck et al. 2023): the base's errors, fixed
    score     from the policy: B problems of D, G chains (y1, y2) each, per step
              stage I:  loss = -A(r2) log p(y2 | x, y1) + beta2 KL(policy || M0) on y1's tokens
              stage II: y1's tokens get A(r1), y2's A(r2 + alpha (r2 - r1)); beta1 KL on both
    every arm: the same problems, G chains each, and the same steps from M0 (score samples them
    from itself, the others once from M0); A = the reward minus its group's mean (rl.advantages)
    metrics, greedy on the test set: accuracy at attempt 1 and 2, delta, wrong->right and
    right->wrong shares, edit distance between the attempts (a spike at 0: it copies itself)
    in parallel instead: two first attempts at the same temperature, the generator's summed
    log-prob picking one (Snell et al. 2024's parallel against sequential); pass@2: a perfect pick

Run: python train.py --method score          (--no-baselines: M0 and SCoRe alone)
Departures: 1) M0 learns the two-attempt format from P (a model trained from scratch has no
instruction following to prompt), with y1 and y2 drawn independently: its second attempt does
not copy the first by design; 2) the SFT baselines train y2's tokens only (a calculator's writes
too), at a per-token mean loss; 3) each attempt's tokens get its own reward alone: y1 gets no
reward gradient in stage I and r1's alone in stage II (the paper's objectives, read as REINFORCE,
would credit y1 with r2, and with the whole return); 4) REINFORCE with a group-mean baseline per
step (rl.py); 5) the chains are sampled at temperature 0.7 and their log-probs taken at 1, with
no importance weight (off-policy; the k3 term then does not estimate the KL exactly); the KL is
summed over character tokens, so beta1 and beta2 are the paper's numbers, not its strength.
"""

import os
import random
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from common import (SWITCH, commit, figure, flag, load_checkpoint, lr_at, non_negative,
                    optimizer_step, paired_difference, positive, presets, read_jsonl,
                    save_checkpoint, seed_for, setting, with_ci, write_atomic)
from rl import advantages, policy_gradient_loss, sampled_examples, token_logps
from star import batch_backward, finetune, make_example, sample
from tasks import TOKENIZER
from tasks.countdown import solutions

TASK_CHOICES = ("countdown",)
INSTRUCTION = "Check and try again:"
ARMS = ("base", "star_wr", "star", "pair_sft", "score")

# Every flag score takes beyond train.py's own, with its value per preset (tiny, small, gpu).
FLAGS = [
    setting("--task", "countdown"),
    setting("--train-difficulty", ("3", "3-4", "3-4")),  # numbers per problem
    setting("--test-difficulty", ("3", "3-4", "3-4")),
    flag("--calculator", ["off", "result"], "result", "the calculator writes each step's result"),
    flag("--n-train", positive(int), (2000, 5000, 50000), "size of P, M0's solved problems"),
    flag("--n-unlabeled", positive(int), (500, 2000, 10000),
         "size of D, problems with answers only: every arm's training problems"),
    flag("--n-test", positive(int), (200, 500, 2000), "held-out test problems"),
    flag("--checkpoint", str, None, "start from this model instead of training M0 on P"),
    flag("--steps", positive(int), (800, 3000, 3000), "training steps of M0 on P"),
    flag("--batch-size", positive(int), (32, 64, 256), "examples per step of M0"),
    flag("--lr", positive(float), (2e-3, 1e-3, 1e-3), "peak learning rate of M0"),
    flag("--compile", SWITCH, False, "torch.compile M0's training forward"),
    # the arms
    flag("--stage1-steps", non_negative(int), (20, 50, 100), "SCoRe's stage I steps"),
    flag("--stage2-steps", positive(int), (25, 100, 200), "SCoRe's stage II steps"),
    flag("--problems", positive(int), (16, 32, 64), "problems per step (B)"),
    flag("--group", positive(int), 8, "chains (y1, y2) per problem (G)"),
    flag("--arm-lr", positive(float), (2e-4, 1e-4, 3e-5), "peak learning rate of every arm"),
    flag("--alpha", non_negative(float), 10.0, "stage II's bonus: alpha (r2 - r1) on r2"),
    flag("--beta1", non_negative(float), 0.01, "KL weight on both attempts (stage II)"),
    flag("--beta2", non_negative(float), 0.1, "KL weight on attempt 1 (stage I)"),
    flag("--temperature", positive(float), 0.7, "sampling temperature of every arm's chains"),
    flag("--eval-every", positive(int), 25, "steps between evaluations of each arm"),
    flag("--no-baselines", SWITCH, True, "train SCoRe alone (no star_wr, star, pair_sft)",
         dest="baselines"),
    flag("--sample-batch-size", positive(int), (512, 512, 2048), "prompts per sampling batch"),
]
DEFAULTS = presets(FLAGS)


def completion_task(args, task):
    return task.with_calculator(args.calculator)

# -----------------------------------------------------------------------------
# Two attempts


def second_problem(p, y1):
    """The problem as attempt 2 sees it: the same numbers and target, its prompt the question,
    attempt 1 and the instruction ("Q: <question>\\n<y1>\\n<INSTRUCTION>\\n")."""
    return replace(p, question=f"{p.question}\n{y1}\n{INSTRUCTION}")


def two_attempts(model, task, problems, n=1, temperature=0.0, batch_size=512, seed=0):
    """n chains per problem: y1 from the prompt, then y2 after y1 and the instruction. Returns
    (y1[i][j], y2[i][j], the tokens the model processed: sampled and prompts read)."""
    y1, c1 = sample(model, task, problems, n=n, temperature=temperature, batch_size=batch_size,
                    seed=seed_for(seed, 1), desc="attempt 1")
    seconds = [second_problem(p, t) for p, ts in zip(problems, y1) for t in ts]
    flat, c2 = sample(model, task, seconds, temperature=temperature, batch_size=batch_size,
                      seed=seed_for(seed, 2), desc="attempt 2")
    y2 = [[flat[i * n + j][0] for j in range(n)] for i in range(len(problems))]
    return y1, y2, c1.sampled + c1.prompt + c2.sampled + c2.prompt


def edit_distance(a, b):
    """Levenshtein distance between two texts, in characters (the tokens here; the paper's is a
    ratio)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def attempt_metrics(task, problems, y1, y2):
    """The paper's metrics of one chain per problem: accuracy at each attempt, their difference
    (= wrong->right - right->wrong), the shares, the edit distance; and each problem's
    rightness at both attempts, for paired intervals."""
    r1 = [int(task.check(p, t)) for p, t in zip(problems, y1)]
    r2 = [int(task.check(p, t)) for p, t in zip(problems, y2)]
    dist = [edit_distance(a, b) for a, b in zip(y1, y2)]
    n = len(problems)
    # does it read its first attempt? the share it copies after a right one and after a wrong one
    copied = lambda ok: [d == 0 for d, r in zip(dist, r1) if r == ok]  # noqa: E731
    share = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"acc_t1": sum(r1) / n, "acc_t2": sum(r2) / n, "delta": (sum(r2) - sum(r1)) / n,
            "wrong_to_right": sum(b > a for a, b in zip(r1, r2)) / n,
            "right_to_wrong": sum(a > b for a, b in zip(r1, r2)) / n,
            "unchanged": sum(d == 0 for d in dist) / n, "edit_distance": sum(dist) / n,
            "copies_right": share(copied(1)), "copies_wrong": share(copied(0)),
            "right_t1": r1, "right_t2": r2}


def held_out_attempts(model, task, test, args):
    """(the metrics of greedy two attempts on the test set, y1, y2)."""
    y1, y2, tokens = two_attempts(model, task, test, batch_size=args.sample_batch_size)
    y1, y2 = [t[0] for t in y1], [t[0] for t in y2]
    return {**attempt_metrics(task, test, y1, y2), "tokens": tokens / len(test)}, y1, y2


def parallel_pick(model, task, test, args, n=8):
    """Two first attempts per problem at the arms' temperature, the one with the higher summed
    log-prob (the generator's own confidence; it favours short answers) kept: its metrics, with
    pass@2 (a perfect picker) and pass@n of n >= 2 samples (what the model solves by sampling)."""
    device = next(model.parameters()).device
    texts, _ = sample(model, task, test, n=n, temperature=args.temperature,
                      batch_size=args.sample_batch_size, seed=seed_for(args.seed, "parallel"))
    two = [ts[:2] for ts in texts]
    with torch.no_grad():
        logp, _ = token_logps(model, *sampled_examples(task, test, two), device)
    score = logp.sum(1).view(len(test), 2)
    right = [[int(task.check(p, t)) for t in ts] for p, ts in zip(test, texts)]
    picked = [r[int(s.argmax())] for r, s in zip(right, score)]
    prompts = sum(len(task.prompt(p)) for p in test)
    sampled = sum(len(t) for ts in two for t in ts)  # (a character is a token)
    return {"acc_pick": sum(picked) / len(test), "right_pick": picked,
            "pass_at_2": sum(max(r[:2]) for r in right) / len(test),
            f"pass_at_{n}": sum(max(r) for r in right) / len(test),
            # both sampled after one prompt, then re-read with it by the scoring pass
            "tokens": (2 * sampled + 3 * prompts) / len(test)}


# -----------------------------------------------------------------------------
# M0 and the SFT baselines' data


def two_attempt_examples(task, P, seed):
    """M0's examples: each problem's y1 and y2 (y2 after y1 and the instruction), two of its
    solutions drawn at random, independently."""
    rng, examples = random.Random(seed), []
    for p in P:
        sols = list(solutions(*p.data))
        y1, y2 = (task.completion(rng.choice(sols), p.answer) for _ in range(2))
        examples += [make_example(task, p, y1), make_example(task, second_problem(p, y1), y2)]
    return examples


def draw(D, args, j):
    """Step j's B problems of D (the same for every arm)."""
    rng = random.Random(seed_for(args.seed, "score problems", j))
    return [D[rng.randrange(len(D))] for _ in range(args.problems)]


def sft_data(task, problems, y1, y2, seed):
    """{arm: its (second-attempt prompt, y2) examples} from M0's chains: star_wr the
    wrong->right ones, star those and right->right, pair_sft each wrong y1 with a right attempt
    (y1 or y2 of any chain) to the same problem, drawn at random."""
    rng, data = random.Random(seed), {"star_wr": [], "star": [], "pair_sft": []}
    for p, a1, a2 in zip(problems, y1, y2):
        right = [t for t in a1 + a2 if task.check(p, t)]
        for t1, t2 in zip(a1, a2):
            r1, r2 = task.check(p, t1), task.check(p, t2)
            if r2:
                for arm in ("star",) if r1 else ("star_wr", "star"):
                    data[arm].append(make_example(task, second_problem(p, t1), t2))
            if right and not r1:
                data["pair_sft"].append(make_example(task, second_problem(p, t1),
                                                     rng.choice(right)))
    return data

# -----------------------------------------------------------------------------
# SCoRe's two stages


def shaped_reward(r1, r2, alpha):
    """Stage II's reward of attempt 2: r2 + alpha (r2 - r1). A correction earns 1 + alpha, a right
    answer kept 1, a wrong one kept 0, a right one broken -alpha."""
    return r2 + alpha * (r2 - r1)


def score_loss(stage, r1, r2, first, second, args):
    """The loss of one step. r1, r2: (B, G) rewards; first, second: (logp, mask, ref logp) of
    y1's and y2's tokens. Stage I: the policy gradient of r2 on y2's tokens, the KL to M0 on
    y1's tokens alone. Stage II: each attempt its own advantage, the KL on both."""
    zero = torch.zeros(r1.numel(), device=first[0].device)
    if stage == 1:
        return (policy_gradient_loss(*second[:2], advantages(r2).flatten().to(zero))
                + policy_gradient_loss(*first[:2], zero, first[2], args.beta2))
    shaped = shaped_reward(r1, r2, args.alpha)
    return (policy_gradient_loss(*first[:2], advantages(r1).flatten().to(zero), first[2],
                                 args.beta1)
            + policy_gradient_loss(*second[:2], advantages(shaped).flatten().to(zero),
                                   second[2], args.beta1))


def score_step(model, ref, task, problems, args, stage, seed):
    """Sample G chains per problem from the policy, take one step; returns the mean rewards."""
    device = next(model.parameters()).device
    model.eval()
    y1, y2, _ = two_attempts(model, task, problems, args.group, args.temperature,
                             args.sample_batch_size, seed)
    r1 = torch.tensor([[float(task.check(p, t)) for t in ts] for p, ts in zip(problems, y1)])
    r2 = torch.tensor([[float(task.check(p, t)) for t in ts] for p, ts in zip(problems, y2)])
    seconds = [second_problem(p, t) for p, ts in zip(problems, y1) for t in ts]
    model.train()
    parts = []
    for probs, texts in ((problems, y1), (seconds, [[t] for ts in y2 for t in ts])):
        examples, masks = sampled_examples(task, probs, texts)
        logp, mask = token_logps(model, examples, masks, device)
        with torch.no_grad():
            ref_logp = token_logps(ref, examples, masks, device)[0]
        parts.append((logp, mask, ref_logp))
    score_loss(stage, r1, r2, *parts, args).backward()
    return r1.mean().item(), r2.mean().item()

# -----------------------------------------------------------------------------
# The driver: M0, then each arm from M0, evaluated every few steps, committed arm by arm


def train_arm(arm, model, ref, task, D, data, args, evaluate):
    """The arm's steps (SCoRe's two stages, or SFT on its examples) with one optimizer and
    schedule; evaluate(step) every --eval-every steps, at the end of stage I and at the end
    (every arm alike). Returns the rows."""
    steps = args.stage1_steps + args.stage2_steps
    opt, rng = model.configure_optimizer(args.arm_lr), random.Random(seed_for(args.seed, arm))
    device, rows, rewards = next(model.parameters()).device, [], []
    bar = tqdm(range(steps), desc=arm, leave=False, dynamic_ncols=True)
    for j in bar:
        if arm == "score":
            stage = 1 if j < args.stage1_steps else 2
            rewards.append(score_step(model, ref, task, draw(D, args, j), args, stage,
                                      seed_for(args.seed, "score sample", j)))
            bar.set_postfix(stage=stage, r1=f"{rewards[-1][0]:.2f}", r2=f"{rewards[-1][1]:.2f}")
        else:
            model.train()
            batch = [data[rng.randrange(len(data))] for _ in range(args.problems * args.group)]
            batch_backward(model, batch, device)
        optimizer_step(opt, model.parameters(), clip=1.0,
                       lr=lr_at(j, steps, args.arm_lr, warmup=min(100, steps // 10 + 1)))
        if (j + 1) % args.eval_every == 0 or j + 1 in (args.stage1_steps, steps):
            model.eval()
            rows.append(evaluate(j + 1))
            if rewards:  # the chains' mean rewards since the last evaluation (as sampled)
                rows[-1].update(train_r1=sum(r[0] for r in rewards) / len(rewards),
                                train_r2=sum(r[1] for r in rewards) / len(rewards))
                rewards = []
    return rows


def run(args, task, P, D, test, out, device, new_model):
    """M0 (committed as the base arm at step 0), then each arm; started again on the folder, it
    resumes after the last committed arm. Returns nothing."""
    task = task.with_calculator(args.calculator)
    m0_path = os.path.join(out, "m0.pt")
    done = {r["arm"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
            if r.get("kind") == "arm"}

    def evaluate(model, arm, step):
        row, y1, y2 = held_out_attempts(model, task, test, args)
        tqdm.write(f"{arm} step {step}: attempt 1 {row['acc_t1']:.3f} attempt 2 "
                   f"{row['acc_t2']:.3f} | wrong->right {row['wrong_to_right']:.3f} "
                   f"right->wrong {row['right_to_wrong']:.3f} unchanged {row['unchanged']:.2f}")
        write_atomic(os.path.join(out, f"samples_{arm}.txt"), "\n".join(
            f"{task.prompt(p)}{a}\n{INSTRUCTION}\n{b}\n[{'right' if task.check(p, a) else 'wrong'}"
            f" -> {'right' if task.check(p, b) else 'wrong'}]\n"
            for p, a, b in list(zip(test, y1, y2))[:8]))
        return {"kind": "eval", "arm": arm, "step": step, **row}

    if "base" not in done:
        t0 = time.time()
        torch.manual_seed(args.seed)
        model = new_model()
        loss = None
        if not args.checkpoint:
            loss = finetune(model, two_attempt_examples(task, P, seed_for(args.seed, "m0 data")),
                            args.steps, args.lr, args.batch_size, seed_for(args.seed, "sft"),
                            desc="M0 on P", compile=args.compile)
        save_checkpoint(m0_path, model, TOKENIZER)
        row = evaluate(model.eval(), "base", 0)
        commit(out, t0, row,
               {"kind": "parallel", "arm": "base", **parallel_pick(model, task, test, args)},
               {"kind": "arm", "arm": "base", "train_loss": loss})
    ref = load_checkpoint(m0_path, device)[0].eval()
    steps = args.stage1_steps + args.stage2_steps
    data = {}
    arms = [a for a in ARMS[1:] if args.baselines or a == "score"]
    if any(a not in done for a in arms if a != "score"):  # M0's chains on every arm's problems
        problems = [p for j in range(steps) for p in draw(D, args, j)]
        y1, y2, _ = two_attempts(ref, task, problems, args.group, args.temperature,
                                 args.sample_batch_size, seed_for(args.seed, "m0 chains"))
        data = sft_data(task, problems, y1, y2, seed_for(args.seed, "pairs"))
    for arm in arms:
        if arm in done:
            continue
        t0 = time.time()
        model = load_checkpoint(m0_path, device)[0]
        if arm != "score" and not data[arm]:
            tqdm.write(f"{arm}: M0's chains gave it no example; it stays M0")
        rows = train_arm(arm, model, ref, task, D, data.get(arm), args,
                         lambda step: evaluate(model, arm, step)) \
            if arm == "score" or data[arm] else []
        save_checkpoint(os.path.join(out, f"{arm}.pt"), model, TOKENIZER)
        parallel = [{"kind": "parallel", "arm": arm, **parallel_pick(model, task, test, args, 2)}] \
            if arm == "score" else []  # (and M0's, above, with pass@8)
        commit(out, t0, *rows, *parallel,
               {"kind": "arm", "arm": arm, "examples": len(data[arm]) if arm in data else None})

# -----------------------------------------------------------------------------
# Report: the last evaluation of each arm, the deltas paired, the figure over training


def last_evals(rows):
    """{arm: its last eval row} (base: M0's)."""
    out = {}
    for r in rows:
        if r.get("kind") == "eval":
            out[r["arm"]] = r
    return out


def headline_differences(rows):
    """{name: (mean, 95% paired CI)} over the test problems (tests/seeds.py reads these): each
    arm's attempt 2 against its attempt 1 and against M0's attempt 1, SCoRe's attempt 2 against
    each arm's, and against two parallel samples picked by log-prob (its own, and M0's)."""
    last = last_evals(rows)
    par = {r["arm"]: r for r in rows if r.get("kind") == "parallel"}
    out = {f"{arm}: attempt 2 - attempt 1": paired_difference(r["right_t2"], r["right_t1"])
           for arm, r in last.items()}
    if "base" in last:  # a delta bought by a worse first attempt is no gain over M0
        out.update({f"{arm} attempt 2 - base attempt 1": paired_difference(
            r["right_t2"], last["base"]["right_t1"]) for arm, r in last.items() if arm != "base"})
    if "score" in last:
        s = last["score"]["right_t2"]
        out.update({f"score - {arm}, attempt 2": paired_difference(s, r["right_t2"])
                    for arm, r in last.items() if arm != "score"})
        out.update({f"score attempt 2 - {arm} parallel pick": paired_difference(
            s, par[arm]["right_pick"]) for arm in ("score", "base") if arm in par})
    return out


def report(args, rows):
    """The table of each arm's last evaluation, the paired differences, score.png."""
    last = last_evals(rows)
    par = {r["arm"]: r for r in rows if r.get("kind") == "parallel"}
    cell = lambda p, key: f"{p[key]:.3f}" if key in p else "-"  # noqa: E731
    lines = ["| arm | step | attempt 1 | attempt 2 | delta | wrong->right | right->wrong | "
             "unchanged | edit distance | parallel pick (log-prob) | pass@2 | pass@8 | wall s |",
             "|---" * 13 + "|"]
    for arm, r in last.items():
        p = par.get(arm, {})
        lines.append(f"| {arm} | {r['step']} | {r['acc_t1']:.3f} | {r['acc_t2']:.3f} | "
                     f"{r['delta']:+.3f} | {r['wrong_to_right']:.3f} | {r['right_to_wrong']:.3f} "
                     f"| {r['unchanged']:.2f} | {r['edit_distance']:.1f} | "
                     f"{cell(p, 'acc_pick')} | {cell(p, 'pass_at_2')} | {cell(p, 'pass_at_8')} | "
                     f"{r['wall_s']} |")
    lines += ["", "| comparison (the same test problems) | difference (95% paired CI) |",
              "|---|---|"]
    lines += [f"| {k} | {with_ci(*d)} |" for k, d in headline_differences(rows).items()]
    plot(os.path.join(args.out, "score.png"), rows, args)
    return "\n".join(lines)


def plot(path, rows, args):
    """Attempt-2 accuracy, the two shares and the unchanged share over training, per arm."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    base = next((r for r in evals if r["arm"] == "base"), None)
    panels = (("acc_t2", "accuracy at attempt 2 (dashed: 1)"), ("wrong_to_right", "wrong -> right"),
              ("right_to_wrong", "right -> wrong"), ("unchanged", "attempt 2 = attempt 1"))
    with figure(path, nrows=2, ncols=2, figsize=(9, 6.5)) as (fig, axes):
        for ax, (key, title) in zip(axes.flat, panels):
            for i, arm in enumerate(ARMS[1:]):
                pts = [(r["step"], r[key]) for r in evals if r["arm"] == arm]
                if pts and base:
                    x, y = zip(*([(0, base[key])] + pts))
                    ax.plot(x, y, marker="o", ms=3, color=f"C{i}", label=arm)
                if pts and base and key == "acc_t2":  # the first attempt, which SFT also moves
                    ax.plot([0] + [r["step"] for r in evals if r["arm"] == arm],
                            [base["acc_t1"]] + [r["acc_t1"] for r in evals if r["arm"] == arm],
                            ls="--", lw=1, color=f"C{i}")
            if base:
                ax.axhline(base[key], color="gray", ls=":", lw=1, label="base (M0)")
            ax.set(title=title, xlabel=f"step ({args.problems * args.group} chains each)")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=8)
        fig.suptitle("learning to correct itself on countdown (greedy, held-out problems)")
