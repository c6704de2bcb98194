"""BERT's uncased WordPiece tokenizer in plain Python, as HuggingFace `tokenizers` runs it
from the model's tokenizer.json (BertNormalizer, BertPreTokenizer, WordPiece, [CLS] … [SEP]).

Written out here rather than depending on `tokenizers`, which pulls in huggingface-hub and its
own dependencies; the steps are few and fixed for this model. Their order follows the Rust
implementation: special tokens are split out of the raw text first, then the text is cleaned,
CJK characters are spaced, accents stripped (NFD, drop Mn) and only then lower-cased.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache

MAX_CHARS_PER_WORD = 100


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # All ASCII non-letters/numbers count, even those Unicode does not call punctuation ($, ^).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def normalize(text: str) -> str:
    """BertNormalizer(clean_text, handle_chinese_chars, strip_accents, lowercase)."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    cleaned = unicodedata.normalize("NFD", "".join(out))
    stripped = "".join(ch for ch in cleaned if unicodedata.category(ch) != "Mn")
    return stripped.lower()


def pre_tokenize(text: str) -> list[str]:
    """BertPreTokenizer: split on whitespace, and every punctuation mark is a word alone.
    (str.split's whitespace is Unicode's White_Space, as Rust's char::is_whitespace.)"""
    words: list[str] = []
    for chunk in text.split():
        word: list[str] = []
        for ch in chunk:
            if _is_punctuation(ch):
                if word:
                    words.append("".join(word))
                    word = []
                words.append(ch)
            else:
                word.append(ch)
        if word:
            words.append("".join(word))
    return words


class WordPiece:
    """Text → token ids for one vocabulary; `encode` adds [CLS] and [SEP] and truncates."""

    def __init__(self, vocab: Mapping[str, int], special: Sequence[str] = (
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), unk: str = "[UNK]",
            cls: str = "[CLS]", sep: str = "[SEP]", prefix: str = "##") -> None:
        self.vocab = dict(vocab)
        self.unk_id = self.vocab[unk]
        self.cls_id = self.vocab[cls]
        self.sep_id = self.vocab[sep]
        self.pad_id = self.vocab.get("[PAD]", 0)
        self.prefix = prefix
        self.special = {s: self.vocab[s] for s in special if s in self.vocab}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.special) + ")")
        self._word = lru_cache(maxsize=1 << 16)(self._word_uncached)

    def _word_uncached(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_CHARS_PER_WORD:
            return (self.unk_id,)
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return (self.unk_id,)  # one piece missing: the whole word is unknown
            ids.append(found)
            start = end
        return tuple(ids)

    def tokenize(self, text: str) -> list[int]:
        """The ids of `text`'s word pieces, without [CLS]/[SEP] or truncation."""
        ids: list[int] = []
        for part in self._split.split(text) if self.special else [text]:
            if not part:
                continue
            special = self.special.get(part)
            if special is not None:
                ids.append(special)
                continue
            for word in pre_tokenize(normalize(part)):
                ids.extend(self._word(word))
        return ids

    def encode(self, text: str, max_length: int) -> list[int]:
        """[CLS] pieces [SEP], the pieces cut so that the whole is at most `max_length`."""
        if max_length < 2:
            raise ValueError("max_length must leave room for [CLS] and [SEP]")
        return [self.cls_id, *self.tokenize(text)[: max_length - 2], self.sep_id]
