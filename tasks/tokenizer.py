"""
The character-level tokenizer every task and model shares: a tiktoken.Encoding built in code.

One token per character of newline + printable ASCII (ids 0..95), then four special tokens:
<|endoftext|>=96, <|startofthought|>=97 (Quiet-STaR), <|endofthought|>=98, <|pad|>=99.
Nothing is downloaded; the vocabulary is written out below.

Test: python -m pytest tests/test_tasks.py -k tokenizer

Departures from a usual tiktoken encoding, on purpose:
1. No merges: the split pattern cuts the text into single characters, so every character is
   its own token. Arithmetic is easier to learn when "624" is always "6","2","4" (a BPE that
   merges digits hides place value from the model).
2. encode() checks the alphabet itself: tiktoken panics (a Rust panic, not a Python error) on a
   character that is not in its table, so we raise a plain ValueError first.
"""

from functools import lru_cache

import tiktoken

NAME = "arith-char-v1"
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))  # ids 0..95, in this order
_CHARS = frozenset(ALPHABET)
SPECIAL_TOKENS = {
    "<|endoftext|>": 96,       # ends every completion
    "<|startofthought|>": 97,  # Quiet-STaR's learned thought delimiters
    "<|endofthought|>": 98,
    "<|pad|>": 99,             # left/right padding in batches; never trained on
}
NEWLINE, EOT, SOT, EOTH, PAD = 0, 96, 97, 98, 99
NOT_TEXT = (SOT, EOTH, PAD)  # never in a solution: the sampler bans them when it writes one
N_VOCAB = len(ALPHABET) + len(SPECIAL_TOKENS)  # 100


@lru_cache(maxsize=None)
def get_tokenizer(name=NAME):
    """The tiktoken.Encoding called `name` (only one exists; cached so it is built once)."""
    if name != NAME:
        raise ValueError(f"unknown tokenizer {name!r}; choose from {NAME}")
    ranks = {ch.encode("ascii"): i for i, ch in enumerate(ALPHABET)}
    # [\s\S] matches any single character, newline included: one piece (and one token) per char.
    return tiktoken.Encoding(name=NAME, pat_str=r"[\s\S]", mergeable_ranks=ranks,
                             special_tokens=SPECIAL_TOKENS, explicit_n_vocab=N_VOCAB)


def encode(text):
    """Token ids of `text`; special tokens written in the text (e.g. "<|endoftext|>") are kept."""
    for ch in text:
        if ch not in _CHARS:
            raise ValueError(f"character {ch!r} is not in the tokenizer's alphabet "
                             "(newline and printable ASCII)")
    return get_tokenizer().encode(text, allowed_special="all")


def decode(ids):
    """The text of token ids 0..99 (any iterable of ints); special tokens decode to their names."""
    ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < N_VOCAB:
            raise ValueError(f"token id {i} is out of range 0..{N_VOCAB - 1}")
    return get_tokenizer().decode(ids)
