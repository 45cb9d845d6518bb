"""A ``tokenizers`` tokenizer (and its chat template and special tokens) from a GGUF file's metadata.

Responsibility: rebuild the tokenizer llama.cpp's ``tokenizer.ggml.*`` keys describe, the way
transformers' GGUF conversion does, so that text encodes to the same ids: ``gpt2`` (byte-level BPE,
with the split regex its ``tokenizer.ggml.pre`` names) and ``llama`` (SentencePiece BPE with byte
fallback, merges from the file or derived from the scores). Control tokens become special tokens,
user-defined ones added tokens; BOS/EOS are added as ``add_bos_token``/``add_eos_token`` say.

Invariants: a tokenizer type we cannot rebuild is a ``ValueError`` naming it; nothing here imports
transformers.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek-V3 (llama.cpp's deepseek-v3): three splits one after the other, as its tokenizer.json has them
_DEEPSEEK3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# tokenizer.ggml.pre -> the regex(es) its merges were learned with (llama.cpp's names), applied in order
SPLITS: dict[str, str | tuple[str, ...]] = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "gpt-4o": _GPT4O_SPLIT,
    "deepseek-v3": _DEEPSEEK3_SPLITS,
}  # fmt: skip
_GPT2_PRE = (None, "default", "gpt-2", "gpt2")  # GPT-2's own regex: ByteLevel's


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = kept[:], 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(kept, map(chr, chars), strict=False))


def _derived_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocabulary implies: every split of a token into two tokens, best score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=False):
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a GGUF whose metadata is ``meta``."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("the GGUF has no tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre")
        split = SPLITS.get(pre)
        if split is None:
            if pre not in _GPT2_PRE:  # the ids may differ from the model's own tokenizer on some texts
                logger.warning("GGUF pre-tokenizer %r is not known here: splitting text as GPT-2 does", pre)
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in ((split,) if isinstance(split, str) else split)),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
        control_ok = alphabet
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        if not merges:
            merges = _derived_merges(tokens, list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None,
                                  unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                               decoders.Strip(content=" ", left=1)])
        control_ok = None
    else:
        raise ValueError(f"GGUF tokenizer {kind!r} is not supported; supported: gpt2, llama")

    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types, strict=False)
               if k == _CONTROL and (control_ok is None or set(t) <= control_ok)]
    if control:
        tokenizer.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types, strict=False)
            if k == _USER_DEFINED and t in vocab]
    if user:
        tokenizer.add_tokens(user)

    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    special = []
    for flag, key in ((add_bos, "bos"), (add_eos, "eos")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        special.append((tokens[token_id], token_id) if flag and isinstance(token_id, int)
                       and 0 <= token_id < len(tokens) else None)
    if any(special):
        bos, eos = special
        single = " ".join([*([f"{bos[0]}:0"] if bos else []), "$A:0", *([f"{eos[0]}:0"] if eos else [])])
        pair = " ".join([single, *([f"{bos[0]}:1"] if bos else []), "$B:1", *([f"{eos[0]}:1"] if eos else [])])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[s for s in special if s is not None])
    return tokenizer


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer_config.json`` equivalent: special tokens by text, the chat template, BOS/EOS flags."""
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    out: dict[str, Any] = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            out[name] = tokens[token_id]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        out["chat_template"] = meta["tokenizer.chat_template"]
    out["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    out["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    return out
