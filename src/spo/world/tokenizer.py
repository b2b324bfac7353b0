"""A CLIP BPE tokenizer built locally for the world's caption grammar.

Every grammar word is one token (merges build it left to right); any other text still tokenizes,
falling back to byte-level characters, exactly as OpenAI's CLIP tokenizer does for rare words.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from spo.world.scenes import all_vocabulary

MAX_LENGTH = 24
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (the GPT-2/CLIP mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _chain(pieces: list[str], merges: list[tuple[str, str]], known: set) -> None:
    """Append the merges that join `pieces` left to right into one token."""
    left = pieces[0]
    for right in pieces[1:]:
        if (left, right) not in known:
            known.add((left, right))
            merges.append((left, right))
        left = left + right


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    known: set = set()
    for word in words:
        _chain(list(word[:-1]) + [word[-1] + "</w>"], merges, known)
    return merges


def write_tokenizer(directory: str | Path, words: list[str] | None = None) -> CLIPTokenizer:
    """Write vocab.json + merges.txt (+ tokenizer config) into `directory` and load them back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = words or all_vocabulary()
    base = _byte_alphabet()
    merges = _merges_for(words)
    for _ in range(20):
        # Merges learnt for one word can split another (BPE applies them by rank); chain the pieces
        # that come out, at lower rank, until every grammar word is a single token.
        tokens = base + [b + "</w>" for b in base] + [a + b for a, b in merges] + [BOS, EOS]
        vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
        tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MAX_LENGTH)
        split = [tokenizer.tokenize(w) for w in words]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            break
        known = set(merges)
        for pieces in split:
            _chain(pieces, merges, known)
    tokenizer.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)
