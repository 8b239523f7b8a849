"""
A GPT-2 written from scratch, with a preallocated KV cache and batched sampling.

Follows GPT-2 (Radford et al. 2019) as nanoGPT does: learned absolute position embeddings,
pre-LayerNorm blocks (eps 1e-5, with biases), GELU (tanh approximation), a fused qkv projection,
causal self-attention through F.scaled_dot_product_attention, and an output head tied to the
token embedding. Parameter names and shapes map one-to-one onto Hugging Face's GPT2LMHeadModel
(their Conv1D weights are our Linear weights transposed).

What the methods need from it, all here:
- forward(idx, pos, mask, cache, return_hidden): explicit position ids and attention mask (for
  left-padded batches and Quiet-STaR's thought mask), a KV cache passed explicitly (KVCache,
  or ConcatCache when gradients must flow through it), and the final hidden states (for a
  verifier's head or Quiet-STaR's mixing head);
- generate(): the one sampler (prefill, then decode_one_token per step, the outputs assembled
  once by finish; or the compiled decode_step). Batched sampling of ragged prompts (left
  padding, per-row positions), several copies of a prompt from one prefill, temperature, top-k, a
  torch.Generator or per-row seeds, per-row stop tokens (end-of-text, or a newline for one
  reasoning step); returns tokens, per-token log-probs and lengths. pick() is its token choice,
  which Quiet-STaR's thoughts use too. generate_naive() is the slow textbook version kept
  beside it, and the tests check that the two agree;
- sequence_logprobs(): log p(completion | prompt), summed and per token, batched;
- ScalarHead and train_bce(): the network with a scalar head read at chosen positions (the
  outcome and process reward models of vstar.py and search.py);
- save_checkpoint / load_checkpoint, device detection, bf16 autocast;
- what every training loop shares: lr_at (the schedule), seed_for (derived seeds), atomic
  JSONL and text writes, bootstrap_ci (the 95% intervals), and the torchrun helpers (wrap_ddp,
  split_batch, all_gather).

Run the tests: python -m pytest tests/test_model.py
Benchmark the sampler: python tests/bench_sampling.py

Departures from GPT-2, on purpose:
1. The vocabulary is a 100-token character set (tasks/tokenizer.py), not GPT-2's 50257 BPE
   tokens, and the sizes are tiny (PRESETS); the architecture is unchanged.
2. No dropout: the models are small and the data is generated afresh, so it is left out.
"""

import functools
import hashlib
import json
import math
import os
import random
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


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

    k[layer] and v[layer] are (B, n_head, max_len, head_size), one tensor per layer (a compiled
    step that writes into a slice of one big tensor copies all of it back every step). `pos`
    counts the columns already written. A forward pass with the cache writes its T new tokens
    at columns [pos, pos + T) of every layer, attends over columns [0, pos + T), and then
    advances pos by T. All rows share the column index: ragged prompts are left-padded so that
    they end together, and each row's real position ids are passed separately.
    The compiled decode step instead sets `col`, a (1,) tensor holding the column of its one new
    token, and attends over all max_len columns under a mask: the same shapes at every step,
    so that it is traced once (see decode_step).
    """

    def __init__(self, config, batch_size, max_len, device, dtype=torch.float32, zero=False):
        # zero=False leaves the memory as it is: columns are read only once written, except by
        # the compiled step, whose mask must not meet a NaN in an unwritten column (zero=True)
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        new = torch.zeros if zero else torch.empty
        self.k = [new(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [new(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0
        self.col = None

    def update(self, layer, k, v):
        K, V = self.k[layer], self.v[layer]
        if self.col is not None:  # fixed shapes: write one column, return all of them (masked)
            K.index_copy_(2, self.col, k)
            V.index_copy_(2, self.col, v)
            return K, V
        end = self.pos + k.size(2)
        if end > K.size(2):
            raise ValueError(f"KV cache overflow: need {end} columns, have {K.size(2)}")
        K[:, :, self.pos:end] = k
        V[:, :, self.pos:end] = v
        return K[:, :, :end], V[:, :, :end]

    def repeat_rows(self, repeats):
        """Row b becomes repeats[b] consecutive rows: a prompt encoded once serves its copies."""
        self.k = [x.repeat_interleave(repeats, dim=0) for x in self.k]  # (B', nh, max_len, hs)
        self.v = [x.repeat_interleave(repeats, dim=0) for x in self.v]


class ConcatCache:
    """A KV cache for training, KVCache's interface (update, pos), that grows by concatenation:
    gradients flow through the cached keys and values (Quiet-STaR's thoughts attend to them),
    and autograd refuses KVCache's in-place writes once a written slice was read."""

    def __init__(self, n_layer):
        self.k, self.v, self.pos = [None] * n_layer, [None] * n_layer, 0

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def repeat_rows(self, n):
        """Each row n times (row b -> rows b*n .. b*n+n-1): n thoughts share one pass 0."""
        self.k = [k.repeat_interleave(n, 0) for k in self.k]
        self.v = [v.repeat_interleave(n, 0) for v in self.v]


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


def right_pad(seqs, pad_id, device):
    """(B, T) ids, each sequence from column 0 and padded after its end. Under a causal mask no
    real token ever sees the padding, so its id does not matter (training batches, scoring)."""
    idx = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return idx.to(device)


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
# Sampling: one token-picking function, one decode loop (and its textbook twin)

def pick(logits, temperature, top_k=None, u=None):
    """Next token ids (...,) from logits (..., V): greedy when temperature == 0.

    Sampling uses the Gumbel-max trick, argmax(logits / temperature + g) with g = -log(-log u)
    and u uniform: the same distribution as softmax sampling, but driven by noise u (..., V)
    drawn up front, so that each row can own its random stream (see generate's seeds). Every
    sampler in the project, Quiet-STaR's thoughts included, picks its tokens here."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return (logits - torch.log(-torch.log(u))).argmax(dim=-1)


def noise(B, T, V, temperature, generator, seeds, device):
    """Uniform noise (B, T, V) for T sampling steps (None when greedy); row b from its own seed
    when seeds are given, so a row's sample depends neither on its batch-mates nor its process."""
    if temperature == 0:
        return None
    if seeds is None:
        return torch.rand(B, T, V, generator=generator, device=device)
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} rows: give one seed per sampled row")
    return torch.stack([torch.rand(T, V, device=device,
                                   generator=torch.Generator(device).manual_seed(s))
                        for s in seeds])


def compute_dtype(model):
    """The dtype the forward pass computes keys and values in: bf16 under autocast on a GPU, the
    weights' dtype otherwise. The KV cache is kept in it: decoding is bound by reading the
    cache, and an fp32 cache under bf16 autocast would double that traffic."""
    device_type = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return next(model.parameters()).dtype


def copies_of(prompts, copies):
    """The number of continuations of each prompt (1 each by default), checked."""
    if copies is None:
        return [1] * len(prompts)
    if len(copies) != len(prompts) or any(c < 1 for c in copies):
        raise ValueError(f"copies {list(copies)} must give each of the {len(prompts)} prompts "
                         "1 or more copies")
    return list(copies)


def decode_step(model, tok, pos, mask, cache):
    """Logits (B, V) of the next token after one new token per row, tok (B, 1) at position ids
    pos (B, 1), with a fixed-shape cache: the new keys and values go to column cache.col and
    the mask (B, 1, 1, max_len) hides the columns not yet written. Every call has the same
    shapes, so torch.compile traces it once (compiled_decode_step); what GPT.forward does for
    one token, without its Python-side position bookkeeping."""
    x = model.transformer.wte(tok) + model.transformer.wpe(pos)
    for layer, block in enumerate(model.transformer.h):
        x = block(x, mask, cache, layer)
    return model.lm_head(model.transformer.ln_f(x))[:, -1]


@functools.cache
def compiled_decode_step(device_type):
    """decode_step through torch.compile; on CUDA with mode="reduce-overhead", which captures it
    as a CUDA graph: one launch per token instead of a few dozen small kernels."""
    return torch.compile(decode_step, mode="reduce-overhead" if device_type == "cuda" else None)


def prefill(model, prompts, copies, max_new_tokens, pad_id, zero_cache=False):
    """Encode each prompt once, left-padded, into a cache with room for max_new_tokens more, and
    copy its cache rows to its copies. Returns the next-token logits (B, V), the cache, each
    row's next position id (B,) and the key-validity mask of every cache column (B, max_len)."""
    device = next(model.parameters()).device
    idx, pos, valid = left_pad(prompts, pad_id, device)  # (U, T0)
    T0 = idx.size(1)
    if T0 + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size {model.config.block_size}")
    cache = KVCache(model.config, len(prompts), T0 + max_new_tokens, device,
                    compute_dtype(model), zero=zero_cache)
    logits = model(idx, pos=pos, mask=padded_mask(valid, T0), cache=cache)[:, -1]  # (U, V)
    if any(c != 1 for c in copies):  # each prompt's cache rows copied to its continuations
        rep = torch.tensor(copies, device=device)
        cache.repeat_rows(rep)
        logits, valid, pos = (x.repeat_interleave(rep, dim=0) for x in (logits, valid, pos))
    valid = torch.cat([valid, valid.new_ones(valid.size(0), max_new_tokens)], 1)
    return logits, cache, pos[:, -1] + 1, valid


def decode_one_token(model, tok, pos, valid, cache):
    """Logits (B, V) after one new token per row (tok, pos: (B,)), appended to the cache as its
    next column, which may see every real column before it (valid: (B, max_len) real columns,
    or None when no row has padding). The eager twin of decode_step."""
    mask = None if valid is None else valid[:, None, None, :cache.pos + 1]  # (B, 1, 1, T)
    return model(tok[:, None], pos=pos[:, None], mask=mask, cache=cache)[:, -1]


def finish(toks, seen, stop, pad_id, max_new_tokens):
    """The decode loop's outputs from its per-step token ids and logits (lists of (B,) and
    (B, V)): each row cut after its first stop token, padded to max_new_tokens. Done once at the
    end, so that the loop itself spends no work on bookkeeping."""
    tokens = torch.stack(toks, 1)  # (B, n)
    B, n = tokens.shape
    stopped = torch.isin(tokens, stop)  # (B, n)
    first = stopped.int().argmax(1)  # the first stop of each row (0 if it has none)
    lengths = torch.where(stopped.any(1), first + 1, n)  # (B,)
    keep = torch.arange(n, device=tokens.device)[None] < lengths[:, None]  # (B, n)
    seen = torch.stack(seen, 1)  # (B, n, V)
    lp = seen.gather(2, tokens[..., None]).squeeze(2) - torch.logsumexp(seen, -1)  # (B, n)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=tokens.device)
    logp = torch.zeros(B, max_new_tokens, device=tokens.device)
    out[:, :n] = torch.where(keep, tokens, pad_id)
    logp[:, :n] = torch.where(keep, lp, 0.0)
    return out, logp, lengths


def use_tool(tool, tok, rows):
    """Tool use inside the sampler, as Cobbe et al. 2021 gave GSM8K's models a calculator: a row
    that samples tool.trigger (e.g. "=") gets what tool(row, its tokens so far) returns queued,
    and its next tokens are those, written by the program instead of sampled (the model still
    reads each, so the cache holds them). rows[r] = (row r's tokens, its queue), mutated."""
    ids = tok.tolist()
    for r, (seq, queue) in enumerate(rows):
        if queue:
            ids[r] = queue.pop(0)
        elif ids[r] == tool.trigger:
            queue.extend(tool(r, seq + [ids[r]]))
        seq.append(ids[r])
    return torch.tensor(ids, dtype=tok.dtype, device=tok.device)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, stop_tokens, pad_id, temperature=1.0, top_k=None,
             generator=None, banned_tokens=(), seeds=None, copies=None, compiled=False,
             tool=None):
    """Sample continuations of a batch of ragged prompts with the KV cache.

    prompts: list of U token lists (any lengths). copies: how many continuations of each
    (default 1 each); prompt u is encoded once and its cache rows are copied to its copies[u]
    rows, so search's many continuations of one prefix cost one prefill. Output rows are the
    copies in prompt order: B = sum(copies).
    stop_tokens: ids that end a row (end-of-text; add the newline to sample one reasoning step);
    the stop token is kept. banned_tokens: ids never sampled (thought tokens, the pad).
    generator: a torch.Generator for the batch's noise; or seeds: one int per output row, each
    row's noise then comes from its own generator (its sample is then the same whatever batch or
    process it lands in: star.sample and torchrun rely on it).
    compiled: decode through compiled_decode_step (off by default; the first call of each new
    batch shape compiles, which takes seconds to a minute). The same tokens as the eager loop.
    tool: a program the model calls by writing a token (a calculator): see use_tool.
    Returns (tokens, logp, lengths):
      tokens (B, max_new_tokens) long, pad_id after each row's stop;
      logp (B, max_new_tokens) float, the model's log-prob of each sampled token at temperature 1
           without top-k (a score of the text itself, not of the sampler), 0 after the stop;
      lengths (B,) tokens generated per row, the stop token included.
    """
    device = next(model.parameters()).device
    logits, cache, pos, valid = prefill(model, prompts, copies_of(prompts, copies),
                                        max_new_tokens, pad_id, zero_cache=compiled)
    B, V = logits.shape
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    ban = torch.zeros(V, device=device)  # added to the logits: -inf at the banned ids
    ban[list(banned_tokens)] = float("-inf")
    u = noise(B, max_new_tokens, V, temperature, generator, seeds, device)
    ragged = valid if bool((~valid).any()) else None  # without padding, no mask at all
    if compiled:
        step, T0 = compiled_decode_step(device.type), cache.pos
        cache.col = torch.tensor([T0], device=device)
        columns = torch.arange(valid.size(1), device=device)
        if device.type == "cuda":  # a CUDA graph reads these at fixed addresses
            for x in cache.k + cache.v + [cache.col]:
                torch._dynamo.mark_static_address(x)
    toks, seen = [], []  # each step's token ids (B,) and logits (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = [([], []) for _ in range(B)] if tool else None  # for the tool: use_tool
    for t in range(max_new_tokens):
        logits = logits.float() + ban
        tok = pick(logits, temperature, top_k, None if u is None else u[:, t])  # (B,)
        if tool:
            tok = use_tool(tool, tok, rows)
        toks.append(tok)
        seen.append(logits)
        if t == max_new_tokens - 1:
            break
        # every 8 tokens, one host sync to stop once every row has written a stop token (a
        # step line of search is 5-12 tokens, so it stops soon after its newline)
        if t % 8 == 7:
            done |= torch.isin(torch.stack(toks[-8:], 1), stop).any(1)
            if bool(done.all()):
                break
        if compiled:  # the cache's every column, those not yet written hidden
            cache.col.fill_(T0 + t)
            mask = (valid & (columns <= T0 + t))[:, None, None, :]  # (B, 1, 1, max_len)
            logits = step(model, tok[:, None], pos[:, None], mask, cache)
        else:
            logits = decode_one_token(model, tok, pos, ragged, cache)
        pos = pos + 1
    return finish(toks, seen, stop, pad_id, max_new_tokens)


@torch.no_grad()
def generate_naive(model, prompts, max_new_tokens, stop_tokens, pad_id, temperature=1.0,
                   top_k=None, generator=None, banned_tokens=(), seeds=None, copies=None,
                   tool=None):
    """The textbook sampler: no cache; every copy of a prompt is its own row, and the whole
    left-padded sequence is recomputed for every new token. Same arguments and results as
    generate(), which must agree with it token for token under the same noise (greedy, a
    generator or per-row seeds: tests/test_model.py); the baseline of tests/bench_sampling.py."""
    device = next(model.parameters()).device
    rows = [p for p, c in zip(prompts, copies_of(prompts, copies)) for _ in range(c)]
    idx, pos, valid = left_pad(rows, pad_id, device)
    B, V = len(rows), model.config.vocab_size
    u = noise(B, max_new_tokens, V, temperature, generator, seeds, device)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros(B, max_new_tokens, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tool_rows = [([], []) for _ in range(B)]
    for t in range(max_new_tokens):
        logits = model(idx, pos=pos, mask=padded_mask(valid, idx.size(1)))[:, -1].float()
        logits[:, list(banned_tokens)] = float("-inf")
        tok = pick(logits, temperature, top_k, None if u is None else u[:, t])  # (B,)
        if tool:
            tok = use_tool(tool, tok, tool_rows)
        tokens[:, t] = torch.where(done, pad_id, tok)
        logp[:, t] = torch.where(done, 0.0, F.log_softmax(logits, -1)[torch.arange(B), tok])
        lengths += (~done).long()
        done |= (tok[:, None] == stop).any(1)
        if bool(done.all()):
            break
        idx = torch.cat([idx, tok[:, None]], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        valid = torch.cat([valid, torch.ones_like(tok[:, None], dtype=torch.bool)], 1)
    return tokens, logp, lengths


# -----------------------------------------------------------------------------
# Log-probabilities of given completions

def sequence_logprobs(model, prompts, completions, pad_id, per_token=False):
    """log p(completion | prompt) for a batch of token-list pairs, with gradients.

    Each pair is concatenated and right-padded. The log-softmax at each completion token is
    gathered; prompt and padding positions are zeroed before summing. Returns the sums (B,), and
    with per_token=True also the per-token log-probs (B, Tc) aligned with each completion, 0 past
    its end.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    idx = right_pad([p + c for p, c in zip(prompts, completions)], pad_id, device)
    keep = torch.zeros(idx.shape, dtype=torch.bool)  # which targets belong to a completion
    for b, (p, c) in enumerate(zip(prompts, completions)):
        keep[b, len(p):len(p) + len(c)] = True
    keep = keep.to(device)
    logits = model(idx[:, :-1])  # (B, T-1, V): position t predicts token t+1
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in at least fp32
    logp = F.log_softmax(logits, dim=-1).gather(2, idx[:, 1:, None]).squeeze(2)  # (B, T-1)
    logp = logp * keep[:, 1:]
    total = logp.sum(dim=1)
    if not per_token:
        return total
    Tc = max(max(len(c) for c in completions), 1)
    tok = torch.zeros(len(prompts), Tc, device=device, dtype=logp.dtype)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        tok[b, :len(c)] = logp[b, len(p) - 1:len(p) - 1 + len(c)]
    return total, tok


# -----------------------------------------------------------------------------
# A scalar head on the network: the verifiers that output one number per position

class ScalarHead(nn.Module):
    """A GPT with a linear head that reads its final hidden states at chosen positions of each
    completion: the ORM reads one position per sample, a process reward model the end of every
    step. The head starts at zero, so every score starts at logit 0 (probability 1/2)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, prompts, completions, reads):
        """Logits (B, S) at the positions reads[b] (indices into completion b), and a mask
        (B, S) of which entries are real (rows have different numbers of reads)."""
        device = self.head.weight.device
        idx = right_pad([p + c for p, c in zip(prompts, completions)], 0, device)
        S = max(1, max(len(r) for r in reads))
        at = torch.zeros(len(prompts), S, dtype=torch.long)
        mask = torch.zeros(len(prompts), S, dtype=torch.bool)
        for b, (p, r) in enumerate(zip(prompts, reads)):
            at[b, :len(r)] = torch.tensor([len(p) + j for j in r], dtype=torch.long)
            mask[b, :len(r)] = True
        _, h = self.gpt(idx, return_hidden=True)  # (B, T, C)
        at = at.to(device)[:, :, None].expand(-1, -1, h.size(-1))  # (B, S, C)
        return self.head(h.gather(1, at).float()).squeeze(-1), mask.to(device)


def train_bce(model, rows, steps, lr, batch_size, seed, desc):
    """Train a ScalarHead with binary cross-entropy: rows are (prompt ids, completion ids, read
    positions, one label in [0, 1] per read). Batches of batch_size rows are drawn with
    replacement; the loss is the mean over every label of the batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    forward = wrap_ddp(model)
    rng = random.Random(seed)
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        share, denom = split_batch(batch, size=lambda row: len(row[3]))
        with autocast(str(model.head.weight.device)):
            logits, mask = forward(*map(list, zip(*[row[:3] for row in share])))
        y = torch.zeros(mask.shape, device=logits.device)
        for b, (_, _, _, labels) in enumerate(share):
            y[b, :len(labels)] = torch.tensor(labels, dtype=torch.float)
        loss = F.binary_cross_entropy_with_logits(logits.float()[mask], y[mask],
                                                  reduction="sum") / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


# -----------------------------------------------------------------------------
# Training-loop pieces every method shares: the schedule, seeds, run files

def bootstrap_ci(values, reps=2000, seed=0):
    """95% percentile-bootstrap interval of the mean of per-problem values, resampling problems;
    for a difference between two methods, pass the per-problem differences."""
    values = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(values), (reps, len(values)))
    lo, hi = np.percentile(values[idx].mean(1), [2.5, 97.5])
    return float(lo), float(hi)


def lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def optimizer_step(opt, params, lr=None, clip=1.0):
    """One update after the loss's backward, the same in every training loop: this step's
    learning rate (None: the optimiser's own, constant), the gradients clipped to norm clip
    (None: not clipped), the step, then the gradients cleared for the next one."""
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def seed_for(*parts):
    """A seed derived from its parts (ints and strings: the run's seed, a stage, an iteration,
    a problem, a sample), the same on every machine and in every process, and unrelated for
    different parts: seed_for(seed, "star", n, i, j) is sample j of problem i in iteration n."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch.Generator takes it


@contextmanager
def figure(path, **subplots):
    """(fig, axes) of plt.subplots(**subplots), drawn off screen (the Agg backend), laid out,
    saved to path at 110 dpi and closed when the block ends: every method's plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def write_atomic(path, text):
    """Write a whole file so that an interrupted run never leaves half of it: written aside,
    then renamed into place. Under torchrun only the main process writes."""
    if is_main():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    barrier()


def write_jsonl(path, rows):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path, *rows):
    """Append rows in one atomic rewrite (the files here are a few rows long): a run's metrics
    row is its commit point, so it is either wholly there or not at all."""
    write_jsonl(path, read_jsonl(path) + list(rows))


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


def wrap_ddp(model):
    """Under torchrun, the model wrapped in DistributedDataParallel (gradients averaged over the
    processes after backward); with one process, the model itself."""
    return DDP(model) if rank_world()[1] > 1 else model


def split_batch(batch, size=lambda item: 1):
    """This process's share of a global batch that every process drew identically (all of it
    with one process), and the divisor of its summed loss.

    Each process sums the losses of its share and divides by (the global batch's size / the
    number of processes): DistributedDataParallel then averages the gradients over processes,
    so a step equals the single-process step on the mean loss of the whole batch. size(item)
    counts what the mean is over (1 per example; its tokens, for a token-level loss)."""
    rank, world = rank_world()
    return batch[rank::world], sum(size(item) for item in batch) / world
