"""
A GPT-2 written from scratch, with a preallocated KV cache and batched sampling.

Follows GPT-2 (Radford et al. 2019) as nanoGPT does: learned absolute position embeddings,
pre-LayerNorm blocks (eps 1e-5, with biases), GELU (tanh approximation), a fused qkv projection,
causal self-attention through F.scaled_dot_product_attention, and an output head tied to the
token embedding. Parameter names and shapes map one-to-one onto Hugging Face's GPT2LMHeadModel
(their Conv1D weights are our Linear weights transposed).

What the methods need from it, all here:
- forward(idx, pos, mask, cache, return_hidden): explicit position ids and attention mask (for
  left-padded batches and Quiet-STaR's thought mask), a KV cache passed explicitly, and the
  final hidden states (for a verifier's head or Quiet-STaR's mixing head);
- generate(): batched sampling of ragged prompts (left padding, per-row positions), temperature,
  top-k, a torch.Generator, per-row stop tokens (end-of-text, or a newline for one reasoning
  step); returns tokens, per-token log-probs and lengths. generate_naive() is the slow textbook
  version kept beside it, and the tests check that the two agree;
- sequence_logprobs(): log p(completion | prompt), summed and per token, batched;
- save_checkpoint / load_checkpoint, device detection, bf16 autocast.

Run the tests: python -m pytest tests/test_model.py
Benchmark the sampler: python tests/bench_sampling.py

Departures from GPT-2, on purpose:
1. The vocabulary is a 100-token character set (tasks/tokenizer.py), not GPT-2's 50257 BPE
   tokens, and the sizes are tiny (PRESETS); the architecture is unchanged.
2. No dropout: the models are small and the data is generated afresh, so it is left out.
"""

import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 256   # longest sequence (prompt + completion) the model can see
    vocab_size: int = 100   # tasks/tokenizer.py: 96 characters + 4 special tokens
    n_layer: int = 4        # transformer blocks
    n_head: int = 4         # attention heads per block
    n_embd: int = 128       # width of the residual stream


# Named sizes. "tiny" trains on a 2-core laptop CPU in minutes; "gpu" is the 6-layer, 384-wide
# model of DESIGN.md's sampling reference points, for one H100.
PRESETS = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=192, block_size=320),
    "gpu": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=512),
}


def get_config(preset, **overrides):
    """A copy of a named preset, with fields overridden (e.g. block_size)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return GPTConfig(**{**asdict(PRESETS[preset]), **overrides})


# -----------------------------------------------------------------------------
# The KV cache

class KVCache:
    """Keys and values of every layer for a batch, preallocated and written in place.

    `pos` counts the columns already written. A forward pass with the cache writes its T new
    tokens at columns [pos, pos + T) of every layer, attends over columns [0, pos + T), and then
    advances pos by T. All rows share the column index: ragged prompts are left-padded so that
    they end together, and each row's real position ids are passed separately.
    """

    def __init__(self, config, batch_size, max_len, device, dtype=torch.float32):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer, k, v):
        T = k.size(2)
        end = self.pos + T
        if end > self.k.size(3):
            raise ValueError(f"KV cache overflow: need {end} columns, have {self.k.size(3)}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# -----------------------------------------------------------------------------
# The network

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, mask, cache, layer):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, Tk, hs), the prefix included
        if mask is None:
            # plain causal attention (a fresh sequence), or one new token that may see the whole
            # cache (T == 1): the fused kernels' fast path, no mask tensor needed
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, T, Tk)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache, layer):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, pos=None, mask=None, cache=None, return_hidden=False):
        """Logits (B, T, vocab) for token ids idx (B, T).

        pos: position ids (B, T) or (T,); default 0..T-1 after whatever the cache holds.
        mask: bool (B, 1, T, Tk), True where a query may attend to a key; Tk = cache.pos + T with
              a cache, else T. Default: causal (and, with a cache, every cached column visible).
        cache: a KVCache; the new keys/values are written at cache.pos and pos advances by T.
        return_hidden: also return the final hidden states (B, T, C), after ln_f, so that
              lm_head(hidden) == logits.
        """
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device)
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        if mask is None and start > 0 and T > 1:
            # new tokens see the whole cache and each other causally
            causal = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(start)
            mask = causal.view(1, 1, T, start + T)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer)
        if cache is not None:
            cache.pos += T
        h = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(h)  # (B, T, vocab)
        return (logits, h) if return_hidden else logits

    def configure_optimizer(self, lr, weight_decay=0.1, betas=(0.9, 0.95)):
        """AdamW, decaying only matrices (not biases, LayerNorm gains), as nanoGPT does."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


# -----------------------------------------------------------------------------
# Batches of ragged sequences

def left_pad(seqs, pad_id, device):
    """Left-pad token lists into (B, T) ids, per-row position ids and a key-validity mask.

    Left padding makes every row end at the same column, so one KV-cache column index serves the
    whole batch during decoding. Row b's real tokens get positions 0, 1, ... from its first real
    token, exactly as if it were alone.
    """
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
    n_pad = torch.tensor([T - len(s) for s in seqs])
    col = torch.arange(T)
    valid = col[None, :] >= n_pad[:, None]  # (B, T) real tokens
    pos = (col[None, :] - n_pad[:, None]).clamp(min=0)  # (B, T)
    return idx.to(device), pos.to(device), valid.to(device)


def padded_mask(valid, T_new):
    """Attention mask (B, 1, T_new, Tk) for the last T_new of Tk columns with key validity `valid`.

    Causal, and padding columns are hidden. A padding query would then see nothing at all, which
    makes softmax produce NaN, so every query may always see itself; padding rows are never read.
    """
    B, Tk = valid.shape
    q = torch.arange(Tk - T_new, Tk, device=valid.device)[:, None]  # (T_new, 1) query columns
    k = torch.arange(Tk, device=valid.device)[None, :]  # (1, Tk) key columns
    causal = k <= q  # (T_new, Tk)
    mask = (causal[None] & valid[:, None, :]) | (k == q)[None]  # (B, T_new, Tk)
    return mask[:, None]


# -----------------------------------------------------------------------------
# Sampling

def _pick(logits, temperature, top_k, u):
    """Next token ids (B,) from logits (B, V): greedy when temperature == 0.

    Sampling uses the Gumbel-max trick, argmax(logits / temperature + g) with g = -log(-log u)
    and u uniform: the same distribution as softmax sampling, but driven by noise u (B, V)
    drawn up front, so that each row can own its random stream (see generate's seeds)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return (logits - torch.log(-torch.log(u))).argmax(dim=-1)


def _noise(B, T, V, temperature, generator, seeds, device):
    """Uniform noise (B, T, V) for T sampling steps; row b from its own seed when seeds given,
    so a row's sample does not depend on the other rows of its batch, or on its process."""
    if temperature == 0:
        return None
    if seeds is None:
        return torch.rand(B, T, V, generator=generator, device=device)
    return torch.stack([torch.rand(T, V, device=device,
                                   generator=torch.Generator(device).manual_seed(s))
                        for s in seeds])


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, stop_tokens, pad_id, temperature=1.0, top_k=None,
             generator=None, banned_tokens=(), seeds=None):
    """Sample continuations of a batch of ragged prompts with the KV cache.

    prompts: list of B token lists (any lengths). stop_tokens: ids that end a row (end-of-text,
    or also the newline to sample one reasoning step); the stop token is kept in the output.
    banned_tokens: ids never sampled (e.g. thought tokens and the pad).
    generator: a torch.Generator for the batch's noise; or seeds: one int per row, each row's
    noise then comes from its own generator (what star.sample uses, so that a problem's samples
    are the same whatever batch or process it lands in).
    Returns (tokens, logp, lengths):
      tokens (B, max_new_tokens) long, pad_id after each row's stop;
      logp (B, max_new_tokens) float, the model's log-prob of each sampled token at temperature 1
           without top-k (a score of the text itself, not of the sampler), 0 after the stop;
      lengths (B,) tokens generated per row, the stop token included.
    """
    device = next(model.parameters()).device
    B = len(prompts)
    idx, pos, valid = left_pad(prompts, pad_id, device)
    T0 = idx.size(1)
    if T0 + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size {model.config.block_size}")
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, T0 + max_new_tokens, device, dtype)
    valid = torch.cat([valid, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], 1)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    ragged = bool((~valid).any())  # without padding, decoding needs no mask at all
    banned = torch.tensor(list(banned_tokens), dtype=torch.long, device=device)

    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros(B, max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    next_pos = pos[:, -1] + 1  # (B,) position id of each row's next token
    V = model.config.vocab_size
    u = _noise(B, max_new_tokens, V, temperature, generator, seeds, device)  # (B, T, V)

    logits = model(idx, pos=pos, mask=padded_mask(valid[:, :T0], T0), cache=cache)[:, -1]
    for t in range(max_new_tokens):
        logits = logits.float()
        if len(banned):
            logits[:, banned] = float("-inf")
        tok = _pick(logits, temperature, top_k, None if u is None else u[:, t])  # (B,)
        lp = F.log_softmax(logits, dim=-1).gather(1, tok[:, None]).squeeze(1)  # (B,)
        # rows that already stopped write padding; no host sync needed for that
        tokens[:, t] = torch.where(done, pad_id, tok)
        logp[:, t] = torch.where(done, 0.0, lp)
        lengths += (~done).long()
        done |= (tok[:, None] == stop).any(1)
        # one sync every 16 tokens to stop early when every row is finished
        if t == max_new_tokens - 1 or (t % 16 == 15 and bool(done.all())):
            break
        # the new token is the last column, so it may see every real column before it
        mask = valid[:, None, None, :T0 + t + 1] if ragged else None  # (B, 1, 1, Tk)
        logits = model(tok[:, None], pos=next_pos[:, None], mask=mask, cache=cache)[:, -1]
        next_pos = next_pos + 1
    return tokens, logp, lengths


@torch.no_grad()
def generate_naive(model, prompt, max_new_tokens, stop_tokens, temperature=1.0, top_k=None,
                   generator=None, banned_tokens=()):
    """The textbook sampler: one prompt, no cache, the whole sequence recomputed every token.

    Kept beside generate() as the reference it must agree with (tests/test_model.py) and as the
    baseline of tests/bench_sampling.py. Returns (tokens, logp) as lists.
    """
    device = next(model.parameters()).device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    u = _noise(1, max_new_tokens, model.config.vocab_size, temperature, generator, None, device)
    out, out_logp = [], []
    for t in range(max_new_tokens):
        logits = model(idx)[:, -1].float()  # (1, V)
        if banned_tokens:
            logits[:, list(banned_tokens)] = float("-inf")
        tok = _pick(logits, temperature, top_k, None if u is None else u[:, t])
        out.append(int(tok))
        out_logp.append(float(F.log_softmax(logits, dim=-1)[0, tok]))
        if out[-1] in stop_tokens:
            break
        idx = torch.cat([idx, tok[:, None]], dim=1)
    return out, out_logp


# -----------------------------------------------------------------------------
# Log-probabilities of given completions

def sequence_logprobs(model, prompts, completions, pad_id, per_token=False):
    """log p(completion | prompt) for a batch of token-list pairs, with gradients.

    Each pair is concatenated and right-padded (padding after the end cannot affect earlier tokens
    under a causal mask). The log-softmax at each completion token is gathered; prompt and
    padding positions are zeroed before summing. Returns the sums (B,), and with per_token=True
    also the per-token log-probs (B, Tc) aligned with each completion, 0 past its end.
    """
    device = next(model.parameters()).device
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    keep = torch.zeros(len(seqs), T, dtype=torch.bool)  # which targets belong to a completion
    for b, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) == 0:
            raise ValueError("every prompt needs at least one token")
        idx[b, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        keep[b, len(p):len(p) + len(c)] = True
    idx, keep = idx.to(device), keep.to(device)
    logits = model(idx[:, :-1])  # (B, T-1, V): position t predicts token t+1
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in at least fp32
    logp = F.log_softmax(logits, dim=-1).gather(2, idx[:, 1:, None]).squeeze(2)  # (B, T-1)
    logp = logp * keep[:, 1:]
    total = logp.sum(dim=1)
    if not per_token:
        return total
    Tc = max(max(len(c) for c in completions), 1)
    tok = torch.zeros(len(seqs), Tc, device=device, dtype=logp.dtype)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        tok[b, :len(c)] = logp[b, len(p) - 1:len(p) - 1 + len(c)]
    return total, tok


# -----------------------------------------------------------------------------
# Devices, precision, checkpoints

def autodetect_device():
    """cuda, mps and cpu are three distinct cases (an Apple GPU is neither of the others)."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast(device):
    """bf16 autocast on a GPU that supports it; full fp32 elsewhere (CPU, mps, older GPUs)."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def save_checkpoint(path, model, tokenizer, extra=None):
    """Save config, weights and the tokenizer's name; atomic (written aside, then renamed)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves its original
    ckpt = {"config": asdict(model.config), "model": model.state_dict(),
            "tokenizer": tokenizer, "extra": extra or {}}
    if is_main():  # torchrun: one process writes, the others wait and may then read it
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    barrier()


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict) from save_checkpoint's file; the dict has 'tokenizer', 'extra'."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


# -----------------------------------------------------------------------------
# More than one process (torchrun, see train.py): with a single process each of these is a no-op

def rank_world():
    """(this process's rank, number of processes): (0, 1) unless torchrun started a group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    """Only the main process writes files and prints."""
    return rank_world()[0] == 0


def barrier():
    if rank_world()[1] > 1:
        dist.barrier()


def all_gather(obj):
    """Every process's obj (any picklable object), in rank order; [obj] with one process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
