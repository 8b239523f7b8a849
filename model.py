"""
GPT-2 (Radford et al. 2019) written from scratch, as nanoGPT does, with a preallocated KV cache
and a batched sampler. Learned position embeddings, pre-LayerNorm blocks, GELU (tanh), a fused
qkv, F.scaled_dot_product_attention and an lm_head tied to wte; the parameter names map one to
one onto Hugging Face's GPT2LMHeadModel. forward() takes position ids, a mask and a cache
(left-padded batches, Quiet-STaR's thoughts); generate() is the one sampler, generate_naive() its
textbook twin, sequence_logprobs() scores given completions.

Run the tests: python -m pytest tests/test_model.py   (the sampler: tests/bench_sampling.py)

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
        """Logits (B, T, vocab) for token ids idx (B, T); with return_hidden also the hidden
        states (B, T, C) after ln_f. pos: position ids (B, T) or (T,), by default counting on
        from the cache. mask: bool (B, 1, T, Tk), True where a query may see a key (Tk =
        cache.pos + T), by default causal. cache: a KVCache, written at cache.pos."""
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
# The KV cache

class KVCache:
    """Keys and values of every layer, (B, n_head, max_len, head_size) each, written in place:
    a forward pass writes its T tokens at columns [pos, pos + T) and attends over [0, pos + T).
    Rows share the column index (ragged prompts are left-padded). The compiled step instead sets
    `col`, a (1,) tensor, and attends over all columns under a mask, in fixed shapes."""

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
    """A KV cache for training, with KVCache's interface, that grows by concatenation: gradients
    flow through the cached keys and values (Quiet-STaR's thoughts attend to them), and autograd
    refuses KVCache's in-place writes once a written slice was read."""

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
    """Next token ids (...,) from logits (..., V): greedy when temperature == 0. Sampling is
    Gumbel-max, argmax(logits / temperature - log(-log u)) for uniform noise u (..., V): softmax
    sampling, driven by noise drawn up front so that each row can own its random stream. Every
    sampler here, Quiet-STaR's thoughts included, chooses its tokens with it."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return (logits - torch.log(-torch.log(u))).argmax(dim=-1)


def sampling_noise(B, T, V, temperature, generator, seeds, device):
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
    """The dtype keys and values are computed in (bf16 under autocast on a GPU, else the
    weights'): the cache is kept in it, since decoding is bound by reading the cache."""
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
    next column, which sees every real column before it (valid: (B, max_len), or None when no
    row has padding)."""
    mask = None if valid is None else valid[:, None, None, :cache.pos + 1]  # (B, 1, 1, T)
    return model(tok[:, None], pos=pos[:, None], mask=mask, cache=cache)[:, -1]


def decode_step(model, tok, pos, mask, cache):
    """decode_one_token with fixed shapes, for torch.compile: tok, pos (B, 1), the new keys and
    values written at column cache.col, the mask (B, 1, 1, max_len) hiding unwritten columns;
    GPT.forward without its Python-side position bookkeeping."""
    x = model.transformer.wte(tok) + model.transformer.wpe(pos)
    for layer, block in enumerate(model.transformer.h):
        x = block(x, mask, cache, layer)
    return model.lm_head(model.transformer.ln_f(x))[:, -1]


@functools.cache
def compiled_decode_step(device_type):
    """decode_step through torch.compile; on CUDA with mode="reduce-overhead", which captures it
    as a CUDA graph: one launch per token instead of a few dozen small kernels."""
    return torch.compile(decode_step, mode="reduce-overhead" if device_type == "cuda" else None)


def fixed_shape_step(model, cache, valid):
    """step(tok, pos) -> logits (B, V) through compiled_decode_step: the same shapes at every
    token (its column in cache.col, the columns not yet written masked), so one trace serves."""
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
    """Up to n tokens from the prefill's logits: next_token(logits, t) chooses each, step(tok,
    pos) feeds it back. Returns each step's token ids (B,) and logits (B, V). Every 8 tokens one
    host sync stops the loop once every row has written a stop token."""
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
    """generate's outputs from the per-step token ids and logits: each row cut after its first
    stop token and padded to max_new_tokens. Done once at the end, not per step."""
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
    that samples tool.trigger (e.g. "=") gets tool(row, its tokens so far) queued as its next
    tokens, written instead of sampled (the model still reads each). rows[r] = (row r's tokens,
    its queue), mutated."""
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
    """Sample continuations of ragged prompts with the KV cache: copies[u] rows of prompt u from
    one prefill (B = sum(copies)), stopping at stop_tokens (kept), banned_tokens never sampled,
    noise from generator or from seeds (one per row: the same sample in any batch or process),
    compiled: through compiled_decode_step, tool: see use_tool. Returns tokens (B, max_new),
    pad_id after the stop; logp, each token's log-prob at temperature 1 without top-k; lengths."""
    device = next(model.parameters()).device
    logits, cache, pos, valid = prefill(model, prompts, copies_of(prompts, copies),
                                        max_new_tokens, pad_id, zero_cache=compiled)
    B, V = logits.shape
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    ban = torch.zeros(V, device=device)  # added to the logits: -inf at the banned ids
    ban[list(banned_tokens)] = float("-inf")
    u = sampling_noise(B, max_new_tokens, V, temperature, generator, seeds, device)
    rows = [([], []) for _ in range(B)] if tool else None  # each row's tokens and tool queue

    def next_token(logits, t):  # (B,) ids, and the logits they were chosen from
        logits = logits.float() + ban
        tok = sample_token(logits, temperature, top_k, None if u is None else u[:, t])
        return (use_tool(tool, tok, rows) if tool else tok), logits

    if compiled:
        step = fixed_shape_step(model, cache, valid)
    else:  # without padding, no mask at all
        step = functools.partial(decode_one_token, model, cache=cache,
                                 valid=valid if bool((~valid).any()) else None)
    toks, seen = decode_n_tokens(step, next_token, logits, pos, max_new_tokens, stop)
    return finish(toks, seen, stop, pad_id, max_new_tokens)


@torch.no_grad()
def generate_naive(model, prompts, max_new_tokens, stop_tokens, pad_id, temperature=1.0,
                   top_k=None, generator=None, banned_tokens=(), seeds=None, copies=None,
                   tool=None):
    """The textbook sampler: no cache, every copy its own row, the whole left-padded sequence
    recomputed for every token. generate() must agree with it token for token under the same
    noise (tests/test_model.py); the baseline of tests/bench_sampling.py."""
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
    tool_rows = [([], []) for _ in range(B)]
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
    return tokens, logp, lengths


# -----------------------------------------------------------------------------
# Log-probabilities of given completions

def sequence_logprobs(model, prompts, completions, pad_id, per_token=False):
    """log p(completion | prompt) (B,) for a batch of token-list pairs, with gradients; with
    per_token=True also the per-token log-probs (B, Tc) aligned with each completion, 0 past its
    end. Each pair is concatenated and right-padded; prompt and padding positions count 0."""
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
# Padding of ragged batches, and the scalar head the verifiers put on a GPT

def left_pad(seqs, pad_id, device):
    """Left-pad token lists into (B, T) ids, per-row position ids and a key-validity mask: every
    row ends at the same column, so one cache column index serves the batch, and row b's real
    tokens get positions 0, 1, ... exactly as if it were alone."""
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
    """Attention mask (B, 1, T_new, Tk) for the last T_new of Tk columns with key validity
    `valid`: causal, padding hidden. Every query may see itself, so that a padding query does
    not see nothing at all (a NaN from softmax); padding rows are never read."""
    B, Tk = valid.shape
    q = torch.arange(Tk - T_new, Tk, device=valid.device)[:, None]  # (T_new, 1) query columns
    k = torch.arange(Tk, device=valid.device)[None, :]  # (1, Tk) key columns
    causal = k <= q  # (T_new, Tk)
    mask = (causal[None] & valid[:, None, :]) | (k == q)[None]  # (B, T_new, Tk)
    return mask[:, None]


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
