"""
V-STaR (Hosseini et al. 2024, arXiv 2402.06457): keep the wrong samples too, train a verifier.

    G_0 <- SFT(base, P's gold)                                         generator_iteration(0)
    for n = 1..T:  label k samples of each problem of P + D from G_(n-1): D_VER += all of them,
                   D_GEN += the right ones;  G_n <- SFT(base, D_GEN)   generator_iteration(n)
    verifiers <- from G_0, on D_VER                                   train_verifiers
    test time: n samples from G_T; best-of-k by each verifier         evaluate_test_time
Verifiers by what they learn from. Outcome labels: DPO (the paper's), ORM, GenRM (Zhang et al.
2024, arXiv 2408.15240). The program's per-step labels: the learned recheck (the task's rule,
then each step recomputed by a network trained on program-written rationales: GenRM-CoT's form,
not its data). Free: majority vote, the generator's mean log-prob (over its own sampled tokens
too, with the calculator), the task's rule alone and times that log-prob, shortest, random. The
exact check: an oracle. --controls: DPO on shared-prefix pairs, the recheck's labels on a
scalar head. regime_map: per number count, the share of pass@1 -> pass@n each one closes.
Departures: a fresh seeded base; DPO adds the right solutions' NLL (RPO; --dpo-nll 0: plain).
Run: python train.py --method vstar          (countdown by default)
"""

import functools
import math
import os
import random
import time
from itertools import product

import torch
import torch.nn.functional as F
from tqdm import tqdm

import star
from common import (SWITCH, all_gather, autocast, best_of_k, bootstrap_ci, commit, committed,
                    figure, flag, load_checkpoint, majority_at_k, non_negative, optimizer_step,
                    paired_difference, pass_at_k, positive, presets, rank_world, read_jsonl,
                    right_answers, save_checkpoint, seed_for, setting, split_batch, with_ci,
                    wrap_ddp, write_jsonl)
from model import ScalarHead, sequence_logprobs
from tasks import EOT, NEWLINE, PAD, TOKENIZER, decode, encode

# The calculator, search.py's too: every sample, step and rollout of a run calls it (use_tool)
CALCULATOR = flag("--calculator", ["off", "result"], "result",
                  "result: the program writes each a op b= result as the model samples (Cobbe et "
                  "al. 2021), in every sample, step and rollout; off: the model computes it")
# Every flag vstar takes beyond train.py's own, with its value per preset (tiny, small, gpu).
# countdown: checking a solution is easier than finding one.
FLAGS = [
    setting("--task", "countdown"),
    # data
    flag("--n-train", positive(int), 2000, "size of P, problems with gold solutions"),
    flag("--n-unlabeled", positive(int), (600, 2000, 10000),
         "size of D, problems with answers but no solutions"),
    flag("--n-test", positive(int), (300, 500, 2000), "held-out test problems"),
    # the generators: G = SFT(a fresh base, D_GEN) every iteration
    flag("--checkpoint", str, None, "the base every generator starts from, instead of a fresh one"),
    flag("--steps", positive(int), (1000, 3000, 3000), "fine-tuning steps of each generator"),
    flag("--batch-size", positive(int), (32, 64, 256), "examples per training step"),
    flag("--lr", positive(float), (2e-3, 1e-3, 1e-3), "peak learning rate"),
    flag("--compile", SWITCH, False, "torch.compile the training forward"),
    flag("--iterations", positive(int), (1, 3, 3),
         "generator iterations after G_SFT (the verifiers learn from their samples)"),
    flag("--sample-batch-size", positive(int), (300, 500, 2048), "prompts per sampling batch"),
    flag("--samples", positive(int), 8, "samples per problem of P + D in each iteration"),
    flag("--temperature", float, 0.7, "sampling temperature of training and test samples"),
    CALCULATOR,
    # the verifiers, from G_SFT on D_VER
    flag("--beta", positive(float), 0.1, "DPO's beta (the DPO paper's default; V-STaR gives none)"),
    flag("--dpo-nll", non_negative(float), 1.0,
         "weight of the right solutions' mean token NLL added to DPO's loss (RPO); 0 is the "
         "paper's plain DPO"),
    flag("--verifier-steps", positive(int), (200, 1000, 2000), "training steps of each verifier"),
    flag("--verifier-lr", positive(float), 3e-4,
         "learning rate of DPO and the scalar-head verifiers"),
    flag("--controls", SWITCH, False,
         "also the two controls: DPO on shared-prefix pairs, and the recheck's per-step labels "
         "on a scalar head (prm on program labels): two more verifiers to train"),
    # test time
    flag("--eval-samples", positive(int), (16, 32, 64),
         "samples per held-out problem for pass@k, best-of-k, majority@k (a power of 2)"),
]
DEFAULTS = presets(FLAGS)

# -----------------------------------------------------------------------------
# The DPO loss and the verifiers


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Rafailov et al. 2023, eq. 7: (mean loss, chosen and rejected rewards, share ranked right)."""
    r_chosen = beta * (pi_chosen - ref_chosen)
    r_rejected = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    return loss, r_chosen.detach(), r_rejected.detach(), (r_chosen > r_rejected).float().mean()


def orm_reads(completion):
    """Where the ORM reads a completion: its last token (the end-of-text)."""
    return [len(completion) - 1]


# GenRM (Zhang et al. 2024): verification as next-token prediction, p(Yes) after a fixed
# question; in this character tokenizer the verdicts are the one-character tokens "Y" and "N".
GENRM_QUESTION = "\nIs the answer correct? "
YES, NO = encode("Y")[0], encode("N")[0]


def genrm_input(prompt, completion):
    """What GenRM reads before its verdict: problem, solution (no end-of-text), question."""
    body = completion[:-1] if completion and completion[-1] == EOT else completion
    return prompt + body + encode(GENRM_QUESTION)


def train_genrm(sft_path, labelled, args, device):
    """GenRM: G_SFT fine-tuned on each sample's verdict mixed with the right ones as solutions."""
    model = load_checkpoint(sft_path, device)[0]
    examples = [(genrm_input(p, c), [YES if ok else NO]) for p, c, ok in labelled] + \
        [(p, c) for p, c, ok in labelled if ok]
    star.finetune(model, examples, args.verifier_steps, args.lr,
                  2 * args.batch_size, seed=seed_for(args.seed, "genrm"), desc="GenRM verifier")
    return model.eval()


# The learned recheck, in GenRM-CoT's form (same paper: a verification rationale, then Yes or No),
# but the task, not a model, writes the rationale (task.recheck): each step recomputed alone
# ("48+11=" -> "59"), the claim out of view; Yes iff every recomputation equals its claim. Over
# many sampled rationales p(Yes) tends to the product over steps of p(claim | operands), which one
# teacher-forced pass computes: recheck_scores.
def recheck_examples(task, labelled):
    """The recheck's rows: each labelled sample's steps alone, with their due results ("59\n")."""
    return [(encode(q), encode(should) + [NEWLINE]) for _, c, _ in labelled
            for q, _, should in task.recheck(decode(c[:-1])) or ()]


def train_recheck(sft_path, task, labelled, args, device):
    """The learned recheck: G_SFT fine-tuned on the labelled samples' rationales, SFT's rate."""
    model = load_checkpoint(sft_path, device)[0]
    star.finetune(model, recheck_examples(task, labelled), args.verifier_steps, args.lr,
                  2 * args.batch_size, seed=seed_for(args.seed, "genrm-cot"),  # (its old name)
                  desc="learned recheck")
    return model.eval()


def recheck_rows(task, problems, texts, finished=None):
    """What the learned recheck reads of each text: (step without its result, claim + newline)
    per step; None where it has no rationale or task.rules_ok rejects it (finished: a whole
    solution)."""
    finished = [True] * len(texts) if finished is None else finished
    return [None if not task.rules_ok(p, t, fin) or (st := task.recheck(t)) is None else
            [(encode(q), encode(claim) + [NEWLINE]) for q, claim, _ in st]
            for p, t, fin in zip(problems, texts, finished)]


@torch.no_grad()
def recheck_scores(verifier, task, problems, texts, finished=None, batch_size=512):
    """The learned recheck's p(Yes) of each text: the product over its steps of p(claim |
    operands), 0 where recheck_rows gives None (every finished solution has as many steps: none
    favoured)."""
    steps = recheck_rows(task, problems, texts, finished)
    rows = [row for st in steps for row in st or ()]
    logp = []
    with autocast(str(next(verifier.parameters()).device)):
        for i in range(0, len(rows), batch_size):
            qs, cs = zip(*rows[i:i + batch_size])
            logp += sequence_logprobs(verifier, list(qs), list(cs), PAD).float().tolist()
    logp = iter(logp)
    return [0.0 if st is None else math.exp(sum(next(logp) for _ in st)) for st in steps]


def step_reads(completion):
    """Where a process reward model reads a completion: each step's newline, the end-of-text."""
    return [j for j, t in enumerate(completion) if t in (NEWLINE, EOT)]


def step_prefixes(text):
    """The prefixes of a solution that end after one of its steps (not the whole solution)."""
    return [text[:i + 1] for i, ch in enumerate(text) if ch == "\n"]


def program_step_rows(task, labelled):
    """The format control's rows: the recheck's per-step labels, for a head read at step ends."""
    return [(p, c, step_reads(c)[:len(st)], [float(claim == should) for _, claim, should in st])
            for p, c, _ in labelled if (st := task.recheck(decode(c[:-1])))]


@torch.no_grad()
def program_scores(head, task, problems, texts, batch_size=256):
    """The format control's score, aggregated as recheck_scores: the product of p(step right)."""
    out = []
    for i in range(0, len(texts), batch_size):
        ps, ts = problems[i:i + batch_size], texts[i:i + batch_size]
        comps = [encode(t) + [EOT] for t in ts]
        n = [len(task.recheck(t) or ()) if task.rules_ok(p, t) else 0 for p, t in zip(ps, ts)]
        logits, _ = head([encode(task.prompt(p)) for p in ps], comps,
                         [step_reads(c)[:max(1, k)] for c, k in zip(comps, n)])
        logp = F.logsigmoid(logits.float())
        out += [math.exp(logp[b, :k].sum().item()) if k else 0.0 for b, k in enumerate(n)]
    return out


def pairs_of(labelled, nearest=False):
    """(prompt, right, wrong) for every right x wrong pair of a problem; nearest: each wrong one
    with the right one sharing its longest prefix only (a step-level pair: the prefix cancels)."""
    by_prompt = {}
    for prompt, completion, ok in labelled:
        by_prompt.setdefault(tuple(prompt), ([], []))[0 if ok else 1].append(completion)
    if not nearest:
        return [(list(p), r, w) for p, (rights, wrongs) in by_prompt.items()
                for r, w in product(rights, wrongs)]
    return [(list(p), max(rights, key=lambda r: shared_prefix(r, w)), w)
            for p, (rights, wrongs) in by_prompt.items() if rights for w in wrongs]


def shared_prefix(a, b):
    """How many leading tokens two sequences share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def train_dpo(sft_path, labelled, args, device, nearest=False):
    """The DPO verifier from G_SFT (also its reference) on pairs_of; + right ones' NLL (RPO)."""
    pairs = pairs_of(labelled, nearest)
    if not pairs:
        raise ValueError("no (right, wrong) pair of the same problem: DPO has nothing to learn")
    # 1) the policy and the frozen reference, both G_SFT
    policy = load_checkpoint(sft_path, device)[0].train()
    ref = load_checkpoint(sft_path, device)[0].eval()
    opt = policy.configure_optimizer(args.verifier_lr, weight_decay=0.0)
    forward = wrap_ddp(policy)
    rng = random.Random(seed_for(args.seed, "dpo nearest" if nearest else "dpo"))
    bar = tqdm(range(args.verifier_steps), desc="DPO verifier" + " (shared prefix)" * nearest,
               leave=False, dynamic_ncols=True)
    accs = []
    opt.zero_grad(set_to_none=True)
    for step in bar:
        # 2) a batch of pairs: log-probs of the right and the wrong ones under both models
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(args.batch_size)]
        share, denom = split_batch(batch)  # torchrun: this process's share
        prompts = [p for p, _, _ in share] * 2
        completions = [r for _, r, _ in share] + [w for _, _, w in share]
        with autocast(str(device)):
            pi = sequence_logprobs(forward, prompts, completions, PAD)  # (2B,)
            with torch.no_grad():
                rf = sequence_logprobs(ref, prompts, completions, PAD)
        # 3) DPO's loss (+ RPO's NLL), one update
        B = len(share)
        loss, _, _, acc = dpo_loss(pi[:B], pi[B:], rf[:B], rf[B:], args.beta)
        if args.dpo_nll:  # RPO: also the right solutions' mean token NLL (departure 5)
            lengths = torch.tensor([len(r) for _, r, _ in share], device=pi.device)
            loss = loss + args.dpo_nll * (-pi[:B] / lengths).mean()
        loss = loss * B / denom  # the share's sum over the global mean's divisor
        loss.backward()
        optimizer_step(opt, policy.parameters(), clip=1.0)
        accs.append(acc.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            pair_acc=f"{sum(accs[-20:]) / len(accs[-20:]):.2f}")
    return policy.eval(), len(pairs)


def train_bce(model, rows, steps, lr, batch_size, seed, desc):
    """A ScalarHead fit by BCE on rows (prompt, completion, read positions, a label per read)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    forward = wrap_ddp(model)
    rng = random.Random(seed)
    model.train()
    opt.zero_grad(set_to_none=True)
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        # 1) a batch of rows: the head's logits at each row's read positions
        batch = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        share, denom = split_batch(batch, size=lambda row: len(row[3]))
        with autocast(str(model.head.weight.device)):
            logits, mask = forward(*map(list, zip(*[row[:3] for row in share])))
        # 2) BCE against each read's label, summed over the batch's reads, one update
        y = torch.zeros(mask.shape, device=logits.device)
        for b, (_, _, _, labels) in enumerate(share):
            y[b, :len(labels)] = torch.tensor(labels, dtype=torch.float)
        loss = F.binary_cross_entropy_with_logits(logits.float()[mask], y[mask],
                                                  reduction="sum") / denom
        loss.backward()
        optimizer_step(opt, model.parameters(), clip=None)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def train_head(sft_path, rows, args, device, name, desc):
    """A scalar-head verifier on G_SFT trained by train_bce: the ORM, the control, search's PRM."""
    model = ScalarHead(load_checkpoint(sft_path, device)[0]).to(device)
    return train_bce(model, rows, args.verifier_steps, args.verifier_lr, 2 * args.batch_size,
                     seed=seed_for(args.seed, name), desc=desc)


def train_orm(sft_path, labelled, args, device):
    """The comparison verifier: G_SFT with a scalar head, BCE on the same labelled samples."""
    rows = [(p, c, orm_reads(c), [float(ok)]) for p, c, ok in labelled]
    return train_head(sft_path, rows, args, device, "orm", "ORM verifier")


@torch.no_grad()
def score_in_shares(score, prompts, completions, batch_size=256):
    """score(prompts, completions) per batch, concatenated; under torchrun each process scores
    its share of the batches and every process gets all the scores."""
    rank, world = rank_world()
    mine = {i: score(prompts[i:i + batch_size], completions[i:i + batch_size])
            for i in range(rank * batch_size, len(prompts), world * batch_size)}
    batches = {i: s for share in all_gather(mine) for i, s in share.items()}
    return [x for i in sorted(batches) for x in batches[i]]


def logprobs(model, prompts, completions, mean=False):
    """log p(y|x) of one batch, summed over the completion (DPO's log V(y|x)), or per token
    (mean=True): the generator's own confidence, the baseline every verifier must beat."""
    s = sequence_logprobs(model, prompts, completions, PAD).float().tolist()
    return [x / max(1, len(c)) for x, c in zip(s, completions)] if mean else s


def token_logprobs(model, prompts, completions):
    """log p of each completion token given what comes before it, one list per pair."""
    _, tok = sequence_logprobs(model, prompts, completions, PAD, per_token=True)
    return [row[:len(c)] for row, c in zip(tok.float().tolist(), completions)]


def logprob_scores(model, prompts, completions, mean=False):
    """logprobs of every (prompt, completion) pair, in batches shared out under torchrun."""
    return score_in_shares(functools.partial(logprobs, model, mean=mean), prompts, completions)


def head_scores(head, prompts, completions):
    """The ORM's score: its scalar head's logit at the end-of-text."""
    return score_in_shares(
        lambda p, c: head(p, c, [orm_reads(x) for x in c])[0][:, 0].float().tolist(),
        prompts, completions)


def genrm_scores(model, prompts, completions):
    """GenRM's score: p(Yes) after the question."""
    def score(p, c):
        inputs = [genrm_input(a, b) for a, b in zip(p, c)]
        return sequence_logprobs(model, inputs, [[YES]] * len(inputs), PAD).float().exp().tolist()
    return score_in_shares(score, prompts, completions)


# -----------------------------------------------------------------------------
# The generator loop, the verifiers, the evaluation


def label(task, problems, texts):
    """(prompt ids, completion ids + end-of-text, right?) for every sample of every problem."""
    return [(encode(task.prompt(p)), encode(t) + [EOT], task.check(p, t))
            for p, ts in zip(problems, texts) for t in ts]


def save_labelled(path, rows):
    write_jsonl(path, [{"prompt": p, "completion": c, "right": ok} for p, c, ok in rows])


def load_labelled(path):
    return [(r["prompt"], r["completion"], r["right"]) for r in read_jsonl(path)]


def per_problem(right, answers, rights, verifier_scores, k):
    """Each problem's pass@k, majority@k and best-of-k per verifier, at one k."""
    rows = {"pass@k": [pass_at_k(len(r), sum(r), k) for r in right],
            "majority@k": [majority_at_k(a, ra, k) for a, ra in zip(answers, rights)]}
    rows.update({f"best-of-k {name}": [best_of_k(sc, r, k) for sc, r in zip(s, right)]
                 for name, s in verifier_scores.items()})
    return rows


def curves(right, answers, verifier_scores, ks):
    """Per k the mean of per_problem; at the largest k, 95% bootstrap CIs of each and of leads."""
    res = {"k": ks, "by_problem": {}}  # by_problem[key][j]: each problem's value at ks[j]
    rights = [right_answers(a, r) for a, r in zip(answers, right)]  # once per problem, not per k
    for k in ks:
        rows = per_problem(right, answers, rights, verifier_scores, k)
        for key, values in rows.items():
            res.setdefault(key, []).append(sum(values) / len(values))
            res["by_problem"].setdefault(key, []).append([round(v, 6) for v in values])
    res["ci"] = {key: bootstrap_ci(v) for key, v in rows.items()}
    for base in ("majority@k", "best-of-k generator"):
        res[f"lead over {base} ci"] = {
            key: bootstrap_ci([x - y for x, y in zip(v, rows[base])])
            for key, v in rows.items() if key.startswith("best-of") and key != base}
    return res


def scorer_reads(task, problems, prompts, comps, names):
    """Mean tokens each scorer's network reads per sample, {name: tokens}: the prompt and the
    completion again (GenRM: and its question; the recheck: the step rows; a rule or a check: 0)."""
    n = len(comps)
    full = sum(len(p) + len(c) for p, c in zip(prompts, comps)) / n
    rows = recheck_rows(task, problems, [decode(c[:-1]) for c in comps])
    cot = sum(len(q) + len(c) for steps in rows for q, c in steps or ()) / n
    cost = {"genrm": full + len(encode(GENRM_QUESTION)), "learned recheck": cot,
            "dpo-reward": 2 * full, "length": 0.0, "random": 0.0, "exact check (oracle)": 0.0,
            "rule": 0.0}
    return {name: cost.get(name, full) for name in names}


def pair_accuracy(right, s):
    """(share of a problem's held-out (right, wrong) pairs ranked right, a tie 1/2; share tied)."""
    good = ties = total = 0
    for r, sc in zip(right, s):
        for a, b in product(range(len(r)), repeat=2):
            if r[a] and not r[b]:
                total += 1
                ties += sc[a] == sc[b]
                good += (sc[a] > sc[b]) + 0.5 * (sc[a] == sc[b])
    return (good / total, ties / total) if total else (float("nan"), float("nan"))


def run(args, task, P, D, test, out, device, new_model):
    """Algorithm 1: each generator iteration is a stage, then the verifiers are trained and
    tested together as the last ("eval"); a rerun on the folder resumes after the last."""
    task = task.with_calculator(args.calculator)  # every sample the generators draw calls it
    gold = star.gold_examples(task, P, with_hints=False)
    done = committed(out, "iteration", kind="iteration")
    for n in range(args.iterations + 1):
        if n not in done:
            t0 = time.time()
            commit(out, t0, generator_iteration(args, task, P + D, test, gold, out, device,
                                                new_model, n))
    if not committed(out, "kind", kind="eval"):
        t0 = time.time()
        d_ver = [(p, c, True) for p, c in gold] + \
            [x for n in range(1, args.iterations + 1) for x in load_labelled(labelled_path(out, n))]
        nets, n_pairs = train_verifiers(args, task, d_ver, generator_path(out, 0), device)
        save_checkpoint(os.path.join(out, "verifier_dpo.pt"), nets["dpo"], TOKENIZER)
        row = evaluate_test_time(args, task, test, nets, out, device)
        commit(out, t0, {**row, "pairs": n_pairs, "d_ver": len(d_ver)})


def generator_iteration(args, task, problems, test, gold, out, device, new_model, n):
    """Iteration n (0: gold only): label G_(n-1)'s samples, G_n = SFT(base, D_GEN); its row."""
    # 1) from n = 1: G_(n-1)'s samples of P + D, labelled; D_VER grows by all, D_GEN by the right
    stats, right = {}, []
    if n > 0:
        generator = load_checkpoint(generator_path(out, n - 1), device)[0].eval()
        texts, _ = star.sample(generator, task, problems, n=args.samples,
                               temperature=args.temperature, seed=seed_for(args.seed, "samples", n),
                               batch_size=args.sample_batch_size, desc=f"generator {n}: sample")
        labelled = label(task, problems, texts)
        save_labelled(labelled_path(out, n), labelled)
        right = [(p, c) for i in range(1, n + 1)
                 for p, c, ok in load_labelled(labelled_path(out, i)) if ok]
        stats = {"samples_right": sum(ok for _, _, ok in labelled) / len(labelled),
                 "d_gen": len(gold) + len(right)}
    # 2) G_n = SFT(base, D_GEN): a fresh base, as the paper restarts; tested greedily, saved
    torch.manual_seed(args.seed)
    model = new_model()
    loss = star.finetune(model, gold + right, args.steps, args.lr, args.batch_size,
                         seed=seed_for(args.seed, "generator", n), desc=f"generator {n}: SFT",
                         compile=args.compile)
    acc, overall, *_ = star.evaluate(model, task, test, args.sample_batch_size)
    save_checkpoint(generator_path(out, n), model, TOKENIZER, extra={"iteration": n})
    tqdm.write(f"generator {n}: greedy accuracy {overall:.3f}")
    return {"kind": "iteration", "iteration": n, "accuracy": overall,
            "accuracy_by_difficulty": {str(d): a for d, a in acc.items()},
            "train_steps": args.steps, "train_loss": loss, **stats}


def generator_path(out, n):
    return os.path.join(out, f"generator_iter{n}.pt")


def labelled_path(out, n):
    return os.path.join(out, f"labelled_iter{n}.jsonl")


def train_verifiers(args, task, d_ver, sft_path, device):
    """Every verifier from G_SFT on the same D_VER: {name: network}, and DPO's pair count."""
    dpo, n_pairs = train_dpo(sft_path, d_ver, args, device)
    nets = {"dpo": dpo, "orm": train_orm(sft_path, d_ver, args, device),
            "genrm": train_genrm(sft_path, d_ver, args, device)}
    if args.controls:  # DPO on step-level pairs
        nets["dpo shared-prefix pairs"] = train_dpo(sft_path, d_ver, args, device, True)[0]
    if task.recheck(decode(d_ver[0][1][:-1])) is not None:  # (a gold solution) a rationale
        nets["learned recheck"] = train_recheck(sft_path, task, d_ver, args, device)
        if args.controls:  # the format control: the recheck's labels on the ORM's network
            nets["program"] = train_head(sft_path, program_step_rows(task, d_ver), args, device,
                                         "program", "PRM on program labels").eval()
    return nets, n_pairs


def score_samples(nets, task, problems, texts, reference, generator):
    """Every verifier's and baseline's score of each (problem, text) pair: {name: scores}."""
    # 1) the verifiers trained on outcome labels: DPO's (three readings), the ORM, GenRM
    prompts = [encode(task.prompt(p)) for p in problems]
    comps = [encode(t) + [EOT] for t in texts]
    dpo = logprob_scores(nets["dpo"], prompts, comps)
    ref = logprob_scores(reference, prompts, comps)
    flat = {"dpo": dpo,  # the paper's score, log V(y|x)
            "dpo-mean": [s / len(c) for s, c in zip(dpo, comps)],  # per completion token
            "dpo-reward": [s - r for s, r in zip(dpo, ref)],  # DPO's implicit reward
            "orm": head_scores(nets["orm"], prompts, comps),
            "genrm": genrm_scores(nets["genrm"], prompts, comps)}
    if "dpo shared-prefix pairs" in nets:  # --controls
        flat["dpo shared-prefix pairs"] = logprob_scores(nets["dpo shared-prefix pairs"],
                                                         prompts, comps)
    # 2) those trained on the program's per-step labels, and the exact check
    if "learned recheck" in nets:
        flat["learned recheck"] = recheck_scores(nets["learned recheck"], task, problems, texts)
        if "program" in nets:  # --controls
            flat["prm on program labels"] = program_scores(nets["program"], task, problems,
                                                           texts)
        flat["exact check (oracle)"] = [float(task.check(p, t)) for p, t in zip(problems, texts)]
    # 3) the baselines a learned verifier must beat: the generator's mean log-prob, shortest, none
    flat.update({"generator": logprob_scores(generator, prompts, comps, mean=True),
                 "length": [-len(c) for c in comps], "random": [0.0] * len(comps)})
    if task.tool is not None:  # its confidence in the tokens it sampled, not the calculator's
        own = [[not w for w in star.tool_written(task, p, t)] + [True]  # (+ the end-of-text)
               for p, t in zip(problems, texts)]
        per_token = score_in_shares(functools.partial(token_logprobs, generator), prompts, comps)
        flat["generator (own tokens)"] = [sum(x for x, k in zip(lp, m) if k) / max(1, sum(m))
                                          for lp, m in zip(per_token, own)]
    if "learned recheck" in nets:  # the recheck's rule without its learned arithmetic: alone
        rule = [float(task.rules_ok(p, t)) for p, t in zip(problems, texts)]  # (ties: uniform)
        flat["rule"] = rule
        flat["rule x generator"] = [g - 1e3 * (1 - r) for r, g in zip(rule, flat["generator"])]
    return flat, prompts, comps


def evaluate_test_time(args, task, test, nets, out, device):
    """G_T's n test samples per problem scored by every verifier and baseline in nets: the eval
    row (best-of-k, majority@k, pass@k against k; tokens per sample; held-out pair accuracy)."""
    # 1) n samples per test problem from the last generator, each scored by every scorer
    generator = load_checkpoint(generator_path(out, args.iterations), device)[0].eval()
    texts, sampled = star.sample(generator, task, test, n=args.eval_samples,
                           temperature=args.temperature, batch_size=args.sample_batch_size,
                           seed=seed_for(args.seed, "test samples"), desc="test samples")
    n = args.eval_samples
    problems = [p for p in test for _ in range(n)]
    flat, prompts, comps = score_samples(nets, task, problems, [t for ts in texts for t in ts],
                                         load_checkpoint(generator_path(out, 0), device)[0].eval(),
                                         generator)
    verifier_scores = {name: [f[i * n:(i + 1) * n] for i in range(len(test))]
                       for name, f in flat.items()}
    # 2) the estimators over k-subsets: every sample labelled once, the labels reused for every
    # k and verifier
    right = [[task.check(p, t) for t in ts] for p, ts in zip(test, texts)]
    answers = [[task.extract_answer(t) for t in ts] for ts in texts]
    res = curves(right, answers, verifier_scores, [2 ** i for i in range(int(math.log2(n)) + 1)])
    # the tokens of k samples of a problem: its prompt once (shared cache rows), k completions,
    # and k passes of a scorer (tokens["prompt"] per problem, the others per sample)
    res["tokens"] = {"prompt": sampled.prompt / len(test),
                     "sampled": sampled.sampled / len(problems),
                     **scorer_reads(task, problems, prompts, comps, list(flat))}
    greedy = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
              if r.get("kind") == "iteration"][-1]["accuracy"]
    pairs = {name: pair_accuracy(right, s) for name, s in verifier_scores.items()}
    return {"kind": "eval", "greedy": greedy, "n": n, "difficulty": [p.difficulty for p in test],
            **res,
            **{f"pair_acc {name}": acc for name, (acc, _) in pairs.items()},
            **{f"pair_ties {name}": ties for name, (_, ties) in pairs.items()}}


def report(args, rows):
    """The table (generator per iteration, then accuracy against k) and vstar.png."""
    # 1) the generators, one row per iteration
    lines = ["| generator | greedy accuracy | right samples | D_GEN | steps | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "iteration":
            name = "G_SFT (P only)" if r["iteration"] == 0 else f"iteration {r['iteration']}"
            right = r.get("samples_right", float("nan"))
            lines.append(f"| {name} | {r['accuracy']:.3f} | {right:.3f} | {r.get('d_gen', '-')} "
                         f"| {r['train_steps']} | {r['wall_s']} |")
    ev = next((r for r in rows if r.get("kind") == "eval"), None)
    if ev is None:
        return "\n".join(lines)
    # 2) every estimator against k, then each verifier at equal compute
    keys = list(ev["ci"])
    lines += ["", "| k | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, k in enumerate(ev["k"]):
        lines.append(f"| {k} | " + " | ".join(f"{ev[key][i]:.3f}" for key in keys) + " |")
    ci = ["{:.3f}-{:.3f}".format(*ev["ci"][key]) for key in keys]
    lines.append("| 95% CI | " + " | ".join(ci) + " |")
    lines += [""] + equal_compute_table(ev)
    if "difficulty" in ev:
        lines += [""] + regime_map([ev]) + [""] + [
            f"numbers {d}: dpo - {best} (the strongest free signal, each half's chosen on the "
            f"other) {with_ci(*cell)}"
            for d, (best, cell) in against_free(ev, "best-of-k dpo").items()]
    lines += ["", f"greedy {ev['greedy']:.3f}; {ev['pairs']} training pairs from "
              f"{ev['d_ver']} labelled samples"]
    plot_curves(ev, os.path.join(args.out, "vstar.png"), args.task)
    return "\n".join(lines)


def paired_cell(ev, a, ja, b, jb):
    """Mean and 95% paired bootstrap interval of a at ks[ja] minus b at ks[jb], per problem."""
    return with_ci(*paired_difference(ev["by_problem"][a][ja], ev["by_problem"][b][jb]))


def cost_of(ev, key, k):
    """Tokens per problem of a method at k samples: the prompt once, k samples, and k passes of
    its scorer (majority vote and pass@k: none)."""
    name = key[len("best-of-k "):] if key.startswith("best-of-k ") else None
    tokens = ev["tokens"]
    return tokens["prompt"] + k * (tokens["sampled"] + (tokens[name] if name else 0.0))


def equal_compute_table(ev):
    """Each verifier at k = n against the generator's log-prob at the same k (the same compute),
    and at the largest k that costs no more than majority@n against majority@n."""
    n, ks, J = ev["k"][-1], ev["k"], len(ev["k"]) - 1
    gap = ev["pass@k"][-1] - ev["pass@k"][0]
    lines = [f"| at k = {n} | accuracy | tokens per problem | lead over the generator's log-prob "
             f"(95% paired CI) | k at the compute of majority@{n} | lead over majority@{n} "
             "there | gap pass@1 -> pass@k closed | held-out pair accuracy (ties) |",
             "|---|---|---|---|---|---|---|---|"]
    for key in [k for k in ev["ci"] if k.startswith("best-of-k ")]:
        name = key[len("best-of-k "):]  # j: the largest k costing no more than majority@n
        j = max(i for i, k in enumerate(ks) if cost_of(ev, key, k) <= cost_of(ev, "m", n) + 1e-9
                or i == 0)
        vs_gen = "-" if name == "generator" else paired_cell(ev, key, J, "best-of-k generator", J)
        closed = (ev[key][-1] - ev["pass@k"][0]) / gap if gap > 0 else float("nan")
        lines.append(f"| {name} | {ev[key][-1]:.3f} | {cost_of(ev, key, n):.0f} | {vs_gen} | "
                     f"{ks[j]} | {paired_cell(ev, key, j, 'majority@k', J)} | {closed:.0%} | "
                     f"{ev['pair_acc ' + name]:.3f} ({ev['pair_ties ' + name]:.0%}) |")
    lines.append(f"| majority vote | {ev['majority@k'][-1]:.3f} | {cost_of(ev, 'm', n):.0f} | "
                 "- | - | - | - | - |")
    lines.append(f"| pass@{n} (the ceiling) | {ev['pass@k'][-1]:.3f} | {cost_of(ev, 'm', n):.0f} "
                 "| - | - | - | 100% | - |")
    return lines


# What costs nothing: signals a learned verifier must beat (majority at the same k is cheaper)
FREE = ("majority@k", "best-of-k generator", "best-of-k generator (own tokens)", "best-of-k rule",
        "best-of-k rule x generator")
REGIME = FREE + ("best-of-k dpo", "best-of-k orm", "best-of-k genrm", "best-of-k learned recheck")


def short(key):
    """A name from its metrics key: "best-of-k dpo" -> "dpo", "majority@k" -> "majority"."""
    return key.removeprefix("best-of-k ").replace("majority@k", "majority")


def regime_map(evs):
    """Per number of a problem (its difficulty), pooled over runs (seeds): pass@1 and pass@n, and
    the share of the gap between them each free signal and each verifier closes at k = n."""
    keys = [k for k in REGIME if all(k in ev["by_problem"] for ev in evs)]
    pooled = {}  # difficulty -> key -> each problem's value at k = 1 (pass@1) or k = n
    for ev in evs:
        for i, d in enumerate(ev["difficulty"]):
            at = pooled.setdefault(d, {})
            at.setdefault("pass@1", []).append(ev["by_problem"]["pass@k"][0][i])
            for key in ("pass@k", *keys):
                at.setdefault(key, []).append(ev["by_problem"][key][-1][i])
    n = evs[0]["k"][-1]
    lines = [f"| numbers | problems | pass@1 | pass@{n} | gap closed at k = {n}: " +
             " | ".join(map(short, keys)) + " |",
             "|---" * (len(keys) + 4) + "|"]
    for d, at in sorted(pooled.items()):
        mean = {key: sum(v) / len(v) for key, v in at.items()}
        gap = mean["pass@k"] - mean["pass@1"]
        cells = [f"{(mean[k] - mean['pass@1']) / gap:.0%}" if gap > 0 else "-" for k in keys]
        lines.append(f"| {d} | {len(at['pass@1'])} | {mean['pass@1']:.3f} | {mean['pass@k']:.3f} "
                     "| " + " | ".join(cells) + " |")
    return lines


def against_free(ev, key):
    """{difficulty: (the free signals chosen, mean and 95% paired interval of key minus the
    strongest free signal at k = n)}. Each half of the problems (by index parity) is scored by
    the signal strongest on the other half: the baseline is not chosen on its own test."""
    out = {}
    for d in sorted(set(ev["difficulty"])):
        idx = [i for i, x in enumerate(ev["difficulty"]) if x == d]
        free = [k for k in FREE if k in ev["by_problem"]]
        at = lambda k, i: ev["by_problem"][k][-1][i]  # noqa: E731
        best = {half: max(free, key=lambda k: sum(at(k, i) for i in idx if i % 2 != half))
                for half in (0, 1)}
        diff = [at(key, i) - at(best[i % 2], i) for i in idx]
        out[d] = (" / ".join(sorted({short(b) for b in best.values()})),
                  paired_difference(diff, [0.0] * len(diff)))
    return out


def plot_curves(ev, path, task_name):
    """vstar.png: held-out accuracy against the tokens every network processed per problem; a
    colour per scorer, solid: learned, dotted: free signals, dashed: oracles."""
    from matplotlib import colormaps
    keys = [k for k in ev["ci"] if k not in ("best-of-k length", "best-of-k random",
                                             "best-of-k dpo-mean")]
    with figure(path, figsize=(8, 4.4)) as (fig, ax):
        for i, key in enumerate(keys):
            ls = "--" if key == "pass@k" or "oracle" in key else ":" if key in FREE else "-"
            ax.plot([cost_of(ev, key, k) for k in ev["k"]], ev[key], ls=ls, label=short(key),
                    marker="s" if key in FREE else "o", ms=4, color=colormaps["tab20"](i % 20))
        ax.axhline(ev["greedy"], color="gray", ls=":", label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens processed per problem (samples and every scorer's passes)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"V-STaR on {task_name}: best-of-k by each scorer, k = 1 to {ev['k'][-1]}",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5),
                  title="solid: learned, dotted: free,\ndashed: oracles", title_fontsize=7)
