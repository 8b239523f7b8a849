"""
What tests/test_distributed.py starts under torchrun (2 CPU processes, gloo); not a test itself.

  torchrun --standalone --nproc_per_node=2 tests/dist_worker.py checks OUT_DIR
      sampling shares and gradients; each process writes OUT_DIR/checks_rank<r>.json
  torchrun --standalone --nproc_per_node=2 tests/dist_worker.py train OUT_DIR [train.py flags]
      runs train.py, recording every file this process opened for writing, renamed into place or
      removed; each process writes OUT_DIR/writes_rank<r>.json (python without torchrun: one
      process, rank 0)
  torchrun ... tests/dist_worker.py search OUT_DIR [train.py flags]
      the same, with search.py's steps and rollouts cut to 12 and 32 tokens, as
      tests/test_search.py does (an untrained generator writes to the end of every budget)
"""

import builtins
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import star  # noqa: E402
from common import all_gather, rank_world  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tasks import get_task, sample_problems  # noqa: E402


def random_model():
    torch.manual_seed(0)  # the same weights in every process
    model = GPT(GPTConfig(block_size=128, vocab_size=100, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)  # large weights, so samples differ from seed to seed
    return model.double()


def checks(out_dir):
    dist.init_process_group("gloo")
    rank, world = rank_world()
    task = get_task("addition")
    problems = sample_problems(task, 11, (1, 2, 3), seed=0)  # 11: the shares are uneven
    net = random_model().eval()

    # 1. each process samples its share of the problems; every process gets all the texts
    seen = []
    generate = star.generate

    def spy(net, prompts, *a, **k):
        seen.extend(prompts)
        return generate(net, prompts, *a, **k)

    star.generate = spy
    texts, _ = star.sample(net, task, problems, n=2, temperature=1.0, seed=5)
    star.generate = generate
    shares = all_gather(seen)
    # the same call in this process alone (no split, no gather): the same texts expected
    common.rank_world, star.all_gather = (lambda: (0, 1)), (lambda x: [x])  # (common.my_share)
    alone, _ = star.sample(net, task, problems, n=2, temperature=1.0, seed=5)
    common.rank_world, star.all_gather = rank_world, all_gather

    # 2. one DDP step on a global batch, bucket by bucket as finetune runs it (a small overhead,
    # so each process's share takes several buckets and no_sync is used), against the
    # single-process gradient of the whole batch in one padded pass
    batch = star.gold_examples(task, problems)[:12]
    ddp = torch.nn.parallel.DistributedDataParallel(random_model())
    star.BUCKET_OVERHEAD = 4
    star.batch_backward(ddp, batch, "cpu")
    single = random_model()
    common.rank_world = lambda: (0, 1)  # common.split_batch: the whole batch, as one process
    star.batch_loss(single, batch, "cpu").backward()
    common.rank_world = rank_world
    diff = max((a.grad - b.grad).abs().max().item()
               for a, b in zip(ddp.module.parameters(), single.parameters()))
    scale = max(b.grad.abs().max().item() for b in single.parameters())

    with open(os.path.join(out_dir, f"checks_rank{rank}.json"), "w") as f:
        json.dump({"world": world, "shares": shares, "texts": texts, "alone": alone,
                   "all_prompts": [star.encode(task.prompt(p)) for p in problems],
                   "grad_diff": diff, "grad_scale": scale}, f)
    dist.destroy_process_group()


def train(out_dir, argv):
    """train.main(argv), with every write of this process recorded."""
    writes = []
    real_open, real_replace, real_remove = builtins.open, os.replace, os.remove

    def spy_open(path, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            writes.append(str(path))
        return real_open(path, mode, *a, **k)

    def spy_replace(src, dst, *a, **k):
        writes.append(str(dst))
        return real_replace(src, dst, *a, **k)

    def spy_remove(path, *a, **k):
        writes.append(str(path))
        return real_remove(path, *a, **k)

    builtins.open, os.replace, os.remove = spy_open, spy_replace, spy_remove
    rank = int(os.environ.get("RANK", 0))
    import train as train_py
    try:
        train_py.main(argv)
    finally:
        builtins.open, os.replace, os.remove = real_open, real_replace, real_remove
        if rank > 0:
            sys.stdout = sys.__stdout__
        with open(os.path.join(out_dir, f"writes_rank{rank}.json"), "w") as f:
            json.dump(writes, f)


if __name__ == "__main__":
    if sys.argv[1] == "checks":
        checks(sys.argv[2])
    else:
        if sys.argv[1] == "search":
            import search
            search.STEP_TOKENS, search.ROLLOUT_TOKENS = 12, 32
        train(sys.argv[2], sys.argv[3:])
