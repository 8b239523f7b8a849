"""
GPT-2 (Radford et al. 2019) from scratch, as nanoGPT writes it; parameter names map one to one onto
Hugging Face's GPT2LMHeadModel. forward() takes position ids, a mask and a KV cache (left-padded
batches, Quiet-STaR's thoughts); generate() is the one batched sampler, generate_naive() its
textbook twin, sequence_logprobs() scores completions. Tests: tests/test_model.py, bench_sampling.py

Departures from GPT-2: 1. a 100-token character vocabulary (tasks/tokenizer.py) and tiny sizes
(PRESETS); 2. no dropout: the models are small and the data is generated afresh.
"""

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 256   # longest sequence (prompt + completion) the model can see
    vocab_size: int = 100   # tasks/tokenizer.py: 96 characters + 4 special tokens
    n_layer: int = 4        # transformer blocks
    n_head: int = 4         # attention heads per block
    n_embd: int = 128       # width of the residual stream


# Named sizes: "tiny" for a laptop CPU, "gpu" for one GPU, "small" between the two.
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
            # causal (a fresh sequence), or one token seeing the whole cache: the fused fast path
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
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
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
        """Logits (B, T, vocab) for ids idx (B, T), with return_hidden also the states (B, T, C)
        after ln_f. pos (B, T) or (T,); mask (B, 1, T, cache.pos + T): True where query sees key."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        # 1) by default the new tokens follow the cache, and see it and each other causally
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device)
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        if mask is None and start > 0 and T > 1:
            causal = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(start)
            mask = causal.view(1, 1, T, start + T)
        # 2) the blocks, each writing its keys and values to the cache, then the head
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
# The KV cache

class KVCache:
    """Every layer's keys and values (B, n_head, max_len, head_size), written in place: T tokens
    at columns [pos, pos + T), the same for every row (ragged prompts are left-padded)."""

    def __init__(self, config, batch_size, max_len, device, dtype=torch.float32, zero=False):
        # zero=True for the compiled step, whose mask must not meet a NaN in an unwritten column
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        new = torch.zeros if zero else torch.empty
        self.k = [new(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [new(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos, self.col = 0, None  # col: fixed_shape_step's (1,) column index

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
    """KVCache's interface for training, growing by concatenation: gradients flow through it
    (Quiet-STaR's thoughts attend to it); autograd refuses in-place writes to a slice once read."""

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
# Sampling: prefill, then one token at a time (gpt-fast's shape), and the textbook twin

def sample_token(logits, temperature, top_k=None, u=None):
    """Next ids (...,) from logits (..., V): argmax at temperature 0, else softmax sampling as
    Gumbel-max over uniform noise u (..., V) drawn up front, so that each row owns its stream."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return (logits - torch.log(-torch.log(u))).argmax(dim=-1)


def sampling_noise(B, T, V, temperature, generator, seeds, device):
    """Uniform noise (B, T, V), None if greedy; row b's from seeds[b] if given, in any batch."""
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
    """The dtype of keys and values (autocast's, else the weights'), and so of the cache, since
    decoding is bound by reading the cache."""
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


def prefill(model, prompts, copies, max_new_tokens, pad_id, zero_cache=False):
    """Encode each prompt once, left-padded, its cache rows copied to its copies. Returns logits
    (B, V), the cache, next position ids (B,) and each cache column's key validity (B, max_len)."""
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
    """Logits (B, V) after tok, pos (B,) as the next cache column; valid: None if no padding."""
    mask = None if valid is None else valid[:, None, None, :cache.pos + 1]  # (B, 1, 1, T)
    return model(tok[:, None], pos=pos[:, None], mask=mask, cache=cache)[:, -1]


def decode_step(model, tok, pos, mask, cache):
    """Logits (B, V) after tok, pos (B, 1) at cache.col: GPT.forward in fixed shapes, to compile."""
    x = model.transformer.wte(tok) + model.transformer.wpe(pos)
    for layer, block in enumerate(model.transformer.h):
        x = block(x, mask, cache, layer)
    return model.lm_head(model.transformer.ln_f(x))[:, -1]


@functools.cache
def compiled_decode_step(device_type):
    """decode_step compiled; on CUDA as a CUDA graph: one launch per token, not dozens."""
    return torch.compile(decode_step, mode="reduce-overhead" if device_type == "cuda" else None)


def fixed_shape_step(model, cache, valid):
    """step(tok, pos) -> logits (B, V) via compiled_decode_step; fixed shapes: one trace serves."""
    device = valid.device
    step = compiled_decode_step(device.type)
    cache.col = torch.tensor([cache.pos], device=device)
    columns = torch.arange(valid.size(1), device=device)
    if device.type == "cuda":  # a CUDA graph reads these at fixed addresses
        for x in cache.k + cache.v + [cache.col]:
            torch._dynamo.mark_static_address(x)

    def one_token(tok, pos):
        cache.col.fill_(cache.pos)
        mask = (valid & (columns <= cache.pos))[:, None, None, :]  # (B, 1, 1, max_len)
        cache.pos += 1
        return step(model, tok[:, None], pos[:, None], mask, cache)
    return one_token


def decode_n_tokens(step, next_token, logits, pos, n, stop):
    """Each step's ids (B,) and logits (B, V): next_token(logits, t) chooses, step(tok, pos) feeds
    back; every 8 tokens one host sync ends the loop once every row has written a stop token."""
    toks, seen = [], []
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    for t in range(n):
        tok, logits = next_token(logits, t)
        toks.append(tok)
        seen.append(logits)
        if t == n - 1:
            break
        if t % 8 == 7:
            done |= torch.isin(torch.stack(toks[-8:], 1), stop).any(1)
            if bool(done.all()):
                break
        logits = step(tok, pos)
        pos = pos + 1
    return toks, seen


def finish(toks, seen, stop, pad_id, max_new_tokens):
    """generate's outputs, each row cut after its first stop and padded: once, not per step."""
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
    """Tool use as Cobbe et al. 2021 gave GSM8K's models a calculator: a row that samples
    tool.trigger (e.g. "=") gets tool(row, its tokens) queued as its next ids. rows[r]: row r's
    (tokens, queue, written: which of its tokens the tool wrote). Returns ids (B,)."""
    ids = tok.tolist()
    for r, (seq, queue, written) in enumerate(rows):
        written.append(bool(queue))
        if queue:
            ids[r] = queue.pop(0)
        elif ids[r] == tool.trigger:  # the model's trigger (one the tool writes is not)
            queue.extend(tool(r, seq + [ids[r]]))
        seq.append(ids[r])
    return torch.tensor(ids, dtype=tok.dtype, device=tok.device)


def mark_written(tool, rows, lengths):
    """After generate: tool.written[r], which of row r's kept tokens the tool wrote (bools)."""
    tool.written = [w[:n] for (_, _, w), n in zip(rows, lengths.tolist())]


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, stop_tokens, pad_id, temperature=1.0, top_k=None,
             generator=None, banned_tokens=(), seeds=None, copies=None, compiled=False,
             tool=None):
    """copies[u] continuations of ragged prompt u from one prefill (B = sum(copies)), up to a stop
    token (kept), banned_tokens never sampled; seeds: one per row, alike in any batch or process.
    Returns tokens (B, max_new), pad_id after the stop; logp (temperature 1, no top-k); lengths.
    tool: a calculator (use_tool); after the call tool.written marks the tokens it wrote."""
    # 1) prefill: each prompt once, its cache rows copied to its copies
    device = next(model.parameters()).device
    logits, cache, pos, valid = prefill(model, prompts, copies_of(prompts, copies),
                                        max_new_tokens, pad_id, zero_cache=compiled)
    # 2) how each token is chosen: banned ids, the noise up front, tool calls
    B, V = logits.shape
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    ban = torch.zeros(V, device=device)  # added to the logits: -inf at the banned ids
    ban[list(banned_tokens)] = float("-inf")
    u = sampling_noise(B, max_new_tokens, V, temperature, generator, seeds, device)
    rows = [([], [], []) for _ in range(B)] if tool else None  # tokens, tool queue, written

    def next_token(logits, t):  # (B,) ids, and the logits they were chosen from
        logits = logits.float() + ban
        tok = sample_token(logits, temperature, top_k, None if u is None else u[:, t])
        return (use_tool(tool, tok, rows) if tool else tok), logits

    # 3) decode one token at a time, then cut each row after its stop
    if compiled:
        step = fixed_shape_step(model, cache, valid)
    else:  # without padding, no mask at all
        step = functools.partial(decode_one_token, model, cache=cache,
                                 valid=valid if bool((~valid).any()) else None)
    toks, seen = decode_n_tokens(step, next_token, logits, pos, max_new_tokens, stop)
    tokens, logp, lengths = finish(toks, seen, stop, pad_id, max_new_tokens)
    if tool:
        mark_written(tool, rows, lengths)
    return tokens, logp, lengths


@torch.no_grad()
def generate_naive(model, prompts, max_new_tokens, stop_tokens, pad_id, temperature=1.0,
                   top_k=None, generator=None, banned_tokens=(), seeds=None, copies=None,
                   tool=None):
    """generate()'s outputs the textbook way: no cache, every copy its own row, all recomputed
    per token. generate() must agree token for token (tests/test_model.py, bench_sampling.py)."""
    # 1) every copy its own left-padded row, and its noise
    device = next(model.parameters()).device
    rows = [p for p, c in zip(prompts, copies_of(prompts, copies)) for _ in range(c)]
    idx, pos, valid = left_pad(rows, pad_id, device)
    B, V = len(rows), model.config.vocab_size
    u = sampling_noise(B, max_new_tokens, V, temperature, generator, seeds, device)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros(B, max_new_tokens, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tool_rows = [([], [], []) for _ in range(B)]
    # 2) each token from the whole sequence so far, appended to it; rows that stopped write pad_id
    for t in range(max_new_tokens):
        logits = model(idx, pos=pos, mask=padded_mask(valid, idx.size(1)))[:, -1].float()
        logits[:, list(banned_tokens)] = float("-inf")
        tok = sample_token(logits, temperature, top_k, None if u is None else u[:, t])  # (B,)
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
    if tool:
        mark_written(tool, tool_rows, lengths)
    return tokens, logp, lengths


# -----------------------------------------------------------------------------
# Log-probabilities of given completions

def sequence_logprobs(model, prompts, completions, pad_id, per_token=False):
    """log p(completion | prompt) (B,) for token-list pairs, with gradients; with per_token=True
    also the per-token log-probs (B, Tc) aligned with each completion, 0 past its end."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    # 1) each pair concatenated and right-padded; only completion targets count
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
    # 2) per token, shifted to start at each completion
    Tc = max(max(len(c) for c in completions), 1)
    tok = torch.zeros(len(prompts), Tc, device=device, dtype=logp.dtype)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        tok[b, :len(c)] = logp[b, len(p) - 1:len(p) - 1 + len(c)]
    return total, tok


# -----------------------------------------------------------------------------
# Padding of ragged batches, and the scalar head the verifiers put on a GPT

def left_pad(seqs, pad_id, device):
    """Left-padded ids, position ids and key validity (B, T): every row ends at the same column, so
    one cache column index serves all, and row b's tokens get positions 0, 1, ... as if alone."""
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
    """Ids (B, T) from column 0; no real token sees the padding (causal), so its id is moot."""
    idx = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return idx.to(device)


def padded_mask(valid, T_new):
    """Attention mask (B, 1, T_new, Tk) for the last T_new of Tk columns: causal, padding hidden.
    Every query sees itself, lest a padding query see nothing (softmax's NaN); it is never read."""
    B, Tk = valid.shape
    q = torch.arange(Tk - T_new, Tk, device=valid.device)[:, None]  # (T_new, 1) query columns
    k = torch.arange(Tk, device=valid.device)[None, :]  # (1, Tk) key columns
    causal = k <= q  # (T_new, Tk)
    mask = (causal[None] & valid[:, None, :]) | (k == q)[None]  # (B, T_new, Tk)
    return mask[:, None]


class ScalarHead(nn.Module):
    """A GPT with a linear head on its final hidden states at chosen positions: one per sample
    for the ORM, the end of every step for a PRM. Zero at first: every score starts at p = 1/2."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, prompts, completions, reads):
        """Logits (B, S) at positions reads[b] of completion b, and which (B, S) are real."""
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
