"""
Reinforcement learning with the checker as the reward: on-policy policy gradient with a group
baseline (the GRPO family: DeepSeekMath, arXiv 2402.03300; without its ratio clipping, which one
update per batch of samples never triggers, and with Dr. GRPO's corrections, arXiv 2503.20783),
beside STaR from the same M0 at equal sampled completions and equal gradient steps.

    M0 <- finetune(fresh, P)                          # star.train_start_model: STaR's own M0
    for round r = 1..R:
        rl:   for each of S steps:                    # policy_gradient_step
                  B problems of D, G samples each from the policy (temperature 1: on-policy)
                  reward = task.check (1 or 0); advantage = reward - its group's mean
                  loss = -(1/BG) sum_i advantage_i sum_t log p(token_it) [+ kl k3(policy, M0)]
        star: the same B*S problems, G samples each from M(r-1); keep the right ones;
              fine-tune M(r-1) on them S steps of B*G sequences   # star_round
        both: greedy accuracy on the test set
STaR's section 3.3 reads STaR as this gradient with the indicator reward, no baseline and no
negatives, sampled once per round (off-policy after its first step): --baseline none is that
reading on-policy; --no-negatives keeps the baseline but drops the gradient of wrong samples.

Run: python train.py --method rl     (--baseline none | --no-negatives | --kl 0.05: ablations)
Departures: 1) the advantage is not divided by the group's spread, and a sample's token terms are
summed, not averaged over its length (Dr. GRPO: both bias the update toward short answers and
toward the easiest and hardest problems); 2) both arms continue from their previous round
(STaR's paper restarts from M0 each iteration), so that both take the same steps from M0;
3) STaR here learns from its kept samples alone (star.py also mixes P's gold rationales back in);
4) STaR's arm samples G per problem at temperature 1, as the policy gradient does (the paper
samples once, greedily).
"""

import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (SWITCH, autocast, commit, figure, flag, load_checkpoint, lr_at,
                    non_negative, optimizer_step, paired_difference, positive, presets, read_jsonl,
                    save_checkpoint, seed_for, setting, with_ci, write_atomic)
from star import (collate, completion_cap, finetune, held_out_results, keep_verified, sample,
                  sample_lines, tool_written, train_start_model)
from tasks import EOT, NOT_TEXT, TOKENIZER, encode

# Every flag rl takes beyond train.py's own, with its value per preset (tiny, small, gpu). M0's
# flags and their values are star's, so that both start from the same model.
FLAGS = [
    setting("--task", "addition"),
    flag("--n-train", positive(int), 300, "size of P, problems with gold rationales (M0's)"),
    flag("--n-unlabeled", positive(int), (600, 2000, 10000),
         "size of D, problems with answers only: both arms sample these"),
    flag("--n-test", positive(int), (300, 500, 2000), "held-out test problems"),
    flag("--checkpoint", str, None, "start from this model instead of training M0 on P"),
    flag("--steps", positive(int), (1000, 3000, 3000), "fine-tuning steps of M0 on P"),
    flag("--batch-size", positive(int), (32, 64, 256), "examples per step of M0"),
    flag("--lr", positive(float), (2e-3, 1e-3, 1e-3), "peak learning rate of M0"),
    flag("--compile", SWITCH, False, "torch.compile the training forward"),
    # the rounds, both arms
    flag("--rounds", positive(int), (6, 8, 10), "rounds after M0, each arm"),
    flag("--round-steps", positive(int), (15, 30, 50), "gradient steps per round, each arm"),
    flag("--problems", positive(int), (16, 32, 64), "problems per step (B)"),
    flag("--group", positive(int), 8, "samples per problem (G): the group of the baseline"),
    flag("--temperature", positive(float), 1.0, "sampling temperature (1: the policy itself)"),
    flag("--round-lr", positive(float), (3e-5, 3e-5, 1e-5), "peak learning rate of a round"),
    # the policy gradient's ablations
    flag("--baseline", ["group", "none"], "group",
         "the advantage: reward - its group's mean, or the reward alone (STaR's reading)"),
    flag("--no-negatives", SWITCH, True, "advantages below 0 count as 0", dest="negatives"),
    flag("--kl", non_negative(float), 0.0,
         "weight of the k3 estimate of KL(policy || M0) per sampled token"),
    flag("--no-star-arm", SWITCH, True, "skip STaR beside it", dest="star_arm"),
    flag("--sample-batch-size", positive(int), (300, 500, 2048), "prompts per sampling batch"),
]
DEFAULTS = presets(FLAGS)

# -----------------------------------------------------------------------------
# The policy gradient: advantages, each sampled token's log-prob, the loss


def advantages(rewards, baseline="group", negatives=True):
    """rewards (B, G) -> advantages (B, G): the reward minus its group's mean ("group"), or the
    reward itself ("none"); negatives=False sets those below 0 to 0. Not divided by the group's
    spread: that would weight problems the policy nearly always (or never) solves the most."""
    adv = rewards - rewards.mean(1, keepdim=True) if baseline == "group" else rewards.clone()
    return adv if negatives else adv.clamp(min=0)


def sampled_examples(task, problems, texts):
    """(prompt ids, completion ids) per sample, row-major (problem, sample), and per sample the
    mask of its completion tokens the policy sampled (not a tool's writes). A completion cut at
    the sampler's cap has no end-of-text: it was never sampled."""
    examples, masks = [], []
    for p, ts in zip(problems, texts):
        for t in ts:
            ids = encode(t)
            ended = len(ids) < completion_cap(task, p.difficulty)
            examples.append((encode(task.prompt(p)), ids + [EOT] * ended))
            masks.append([not w for w in tool_written(task, p, t)] + [True] * ended)
    return examples, masks


def token_logps(model, examples, masks, device):
    """(log-probs (N, T) of each example's completion tokens under model, at the sampler's
    distribution (the tokens it bans get none), the mask (N, T) of those the policy sampled)."""
    idx, tgt = collate(examples, device)
    with autocast(str(device)):
        logits = model(idx)
    logits = logits.float()
    logits[..., list(NOT_TEXT)] = float("-inf")
    logp = F.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    mask = torch.zeros_like(tgt, dtype=torch.bool)
    for i, ((p, c), m) in enumerate(zip(examples, masks)):
        mask[i, len(p) - 1:len(p) - 1 + len(c)] = torch.tensor(m, dtype=torch.bool)
    return logp.masked_fill(~mask, 0.0), mask


def policy_gradient_loss(logp, mask, adv, ref_logp=None, kl=0.0):
    """-(1/N) sum_i adv_i sum_t logp_it over the N samples' sampled tokens, + kl (1/N) sum_i
    sum_t k3_it, k3 = exp(r) - r - 1 with r = ref_logp - logp: GRPO's KL term. Its value is an
    unbiased, non-negative estimate of KL(policy || ref); its gradient, (1 - p_ref/p) grad log p
    a token, is in expectation that of KL(ref || policy), token by token. Per-sample sums over a
    constant N: no length normalisation."""
    n = logp.size(0)
    loss = -(adv[:, None] * logp * mask).sum() / n
    if kl:
        r = (ref_logp - logp) * mask
        loss = loss + kl * ((torch.exp(r) - r - 1) * mask).sum() / n
    return loss


def draw(D, args, r, j):
    """Step j of round r's problems: B of D, the same for both arms."""
    rng = random.Random(seed_for(args.seed, "rl problems", r, j))
    return [D[rng.randrange(len(D))] for _ in range(args.problems)]


def rewards_of(task, problems, texts):
    return torch.tensor([[float(task.check(p, t)) for t in ts] for p, ts in zip(problems, texts)])


def rl_round(model, ref, task, D, args, r):
    """S on-policy steps of the policy gradient; returns the round's stats."""
    device = next(model.parameters()).device
    opt = model.configure_optimizer(args.round_lr)
    stats = {"reward": 0.0, "zero_advantage_groups": 0.0, "sampled_tokens": 0, "samples": 0,
             "train_steps": 0}
    bar = tqdm(range(args.round_steps), desc=f"round {r}: rl", leave=False, dynamic_ncols=True)
    for j in bar:
        # 1) sample the group of each problem from the policy as it is now
        problems = draw(D, args, r, j)
        model.eval()
        texts, cost = sample(model, task, problems, n=args.group, temperature=args.temperature,
                             batch_size=args.sample_batch_size,
                             seed=seed_for(args.seed, "rl sample", r, j), desc="sample")
        rewards = rewards_of(task, problems, texts)
        adv = advantages(rewards, args.baseline, args.negatives).flatten().to(device)
        # 2) one update on every sampled token (the tokens of M0 for the KL)
        model.train()
        examples, masks = sampled_examples(task, problems, texts)
        logp, mask = token_logps(model, examples, masks, device)
        ref_logp = None
        if args.kl:
            with torch.no_grad():
                ref_logp = token_logps(ref, examples, masks, device)[0]
        loss = policy_gradient_loss(logp, mask, adv, ref_logp, args.kl)
        loss.backward()
        optimizer_step(opt, model.parameters(), clip=1.0,
                       lr=lr_at(j, args.round_steps, args.round_lr,
                                warmup=min(100, args.round_steps // 10 + 1)))  # finetune's
        stats["reward"] += rewards.mean().item() / args.round_steps
        stats["zero_advantage_groups"] += (rewards.std(1) == 0).float().mean().item() / \
            args.round_steps
        stats["sampled_tokens"] += cost.sampled
        stats["samples"] += sum(map(len, texts))
        stats["train_steps"] += 1
        bar.set_postfix(reward=f"{rewards.mean().item():.3f}")
    model.eval()
    return stats


def star_round(model, task, D, args, r):
    """STaR at the same budget: the round's B*S problems, G samples each from the model as the
    round starts, the right ones kept, then S fine-tuning steps of B*G sequences on them."""
    problems = [p for j in range(args.round_steps) for p in draw(D, args, r, j)]
    texts, cost = sample(model, task, problems, n=args.group, temperature=args.temperature,
                         batch_size=args.sample_batch_size,
                         seed=seed_for(args.seed, "star sample", r), desc=f"round {r}: star")
    kept, _ = keep_verified(task, problems, texts)
    stats = {"reward": rewards_of(task, problems, texts).mean().item(), "kept": len(kept),
             "sampled_tokens": cost.sampled, "samples": sum(map(len, texts)),
             "train_steps": args.round_steps if kept else 0}
    if kept:
        stats["train_loss"] = finetune(model, kept, args.round_steps, args.round_lr,
                                       args.problems * args.group,
                                       seed=seed_for(args.seed, "star fine-tune", r),
                                       desc=f"round {r}: star fine-tune", compile=args.compile)
    return stats

# -----------------------------------------------------------------------------
# The driver: M0, then both arms round by round, each round committed


def run(args, task, P, D, test, out, device, new_model):
    """M0 (STaR's recipe, committed as round 0), then each arm's rounds; started again on the
    folder, it resumes after the last committed round of each arm. Returns nothing."""
    path = lambda arm, r: os.path.join(out, f"{arm}_round{r}.pt")  # noqa: E731
    done = {(row["arm"], row["round"]) for row in read_jsonl(os.path.join(out, "metrics.jsonl"))
            if row.get("kind") == "round"}  # the committed rounds (none in a new folder)
    if ("m0", 0) not in done:
        t0 = time.time()
        torch.manual_seed(args.seed)
        model = new_model()
        loss = None if args.checkpoint else train_start_model(model, task, P, args)
        save_checkpoint(path("m0", 0), model, TOKENIZER)
        row, _ = held_out_results(model.eval(), task, test, args)
        commit(out, t0, {"kind": "round", "arm": "m0", "round": 0, **row, "train_loss": loss})
        tqdm.write(f"M0: accuracy {row['accuracy']:.3f}")
    ref = load_checkpoint(path("m0", 0), device)[0].eval()
    arms = ("rl", "star") if args.star_arm else ("rl",)
    for r in range(1, args.rounds + 1):
        for arm in arms:
            if (arm, r) in done:
                continue
            t0 = time.time()
            model = load_checkpoint(path(arm, r - 1) if r > 1 else path("m0", 0), device)[0]
            stats = rl_round(model, ref, task, D, args, r) if arm == "rl" else \
                star_round(model, task, D, args, r)
            row, texts = held_out_results(model.eval(), task, test, args)
            save_checkpoint(path(arm, r), model, TOKENIZER)
            write_atomic(os.path.join(out, f"samples_{arm}_round{r}.txt"),
                         "\n".join(sample_lines(task, test, texts)))
            commit(out, t0, {"kind": "round", "arm": arm, "round": r, **row, **stats})
            if r > 1 and os.path.exists(path(arm, r - 1)):
                os.remove(path(arm, r - 1))
            tqdm.write(f"round {r} {arm}: accuracy {row['accuracy']:.3f} | train reward "
                       f"{stats['reward']:.3f}")


# -----------------------------------------------------------------------------
# Report: accuracy after every round for both arms, the last round paired


def headline_differences(rows):
    """{name: (mean, 95% paired CI)}: rl against star, and each against M0, after the last round
    both arms have (tests/seeds.py reads these)."""
    by = {(r["arm"], r["round"]): r for r in rows if r.get("kind") == "round"}
    last, out = max((n for arm, n in by if arm == "rl"), default=0), {}
    for a, b in (("rl", "star"), ("rl", "m0"), ("star", "m0")):
        ra, rb = by.get((a, last)), by.get((b, 0 if b == "m0" else last))
        if ra and rb and last:
            out[f"{a} - {b}, round {last}"] = paired_difference(ra["right"], rb["right"])
    return out


def report(args, rows):
    """The table of rounds, RL against STaR and M0 at the last round (paired), accuracy.png."""
    rows = [r for r in rows if r.get("kind") == "round"]
    by = {(r["arm"], r["round"]): r for r in rows}
    lines = ["| arm | round | accuracy | train reward | kept | sampled completions | steps | "
             "wall s |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['round']} | {r['accuracy']:.3f} | "
                     f"{r.get('reward', float('nan')):.3f} | {r.get('kept', '-')} | "
                     f"{r.get('samples', 0) * r['round']} | {r.get('train_steps', 0)} | "
                     f"{r['wall_s']} |")
    lines += ["", "| comparison (the same test problems) | difference (95% paired CI) |",
              "|---|---|"]
    lines += [f"| {k} | {with_ci(*d)} |" for k, d in headline_differences(rows).items()]
    with figure(os.path.join(args.out, "accuracy.png"), figsize=(6, 4)) as (fig, ax):
        m0 = by.get(("m0", 0))
        for i, arm in enumerate(("rl", "star")):
            pts = sorted((r["round"], r["accuracy"]) for r in rows if r["arm"] == arm)
            if pts and m0:
                x, y = zip(*([(0, m0["accuracy"])] + pts))
                ax.plot(x, y, marker="o", color=f"C{i}", label=arm)
        ax.set(xlabel=f"round ({args.round_steps} steps, "
                      f"{args.round_steps * args.problems * args.group} samples each arm)",
               ylabel="held-out accuracy (greedy)", title=f"{args.method} on {args.task}")
        ax.grid(alpha=0.3)
        ax.legend()
    return "\n".join(lines)
