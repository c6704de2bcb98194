"""all-MiniLM-L6-v2 as sentence-transformers runs it: WordPiece (at most 256 tokens), the
6-layer BERT, mean pooling over the real tokens, L2 normalisation. numpy only, offline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from aquila_client.text.bert import Bert
from aquila_client.text.weights import ModelFiles, find_model, read_safetensors
from aquila_client.text.wordpiece import WordPiece

# What this implementation reproduces; a tokenizer.json asking for anything else is refused
# rather than tokenized differently in silence.
_NORMALIZER = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
               "lowercase": True}


class SentenceEncoder:
    """Texts → unit-length float32 vectors (n × 384 for all-MiniLM-L6-v2).

    `SentenceEncoder()` loads the weights from the installed package (see weights.py);
    `SentenceEncoder(path)` from a model folder or zip. Loading takes about a second."""

    def __init__(self, path: str | Path | None = None) -> None:
        files = find_model(path)
        try:
            self._load(files)
        finally:
            files.close()

    def _load(self, files: ModelFiles) -> None:
        tok = files.json("tokenizer.json")
        norm = tok.get("normalizer") or {}
        if any(norm.get(k) != v for k, v in _NORMALIZER.items()) or norm.get(
                "strip_accents") not in (None, True):
            raise ValueError(f"{files}: unsupported tokenizer normalizer {norm}")
        if (tok.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
            raise ValueError(f"{files}: unsupported pre-tokenizer")
        model = tok.get("model") or {}
        if model.get("type") != "WordPiece":
            raise ValueError(f"{files}: the tokenizer is not WordPiece")
        specials = [t["content"] for t in tok.get("added_tokens", []) if t.get("special")]
        self.tokenizer = WordPiece(model["vocab"], special=specials,
                                   unk=model.get("unk_token", "[UNK]"),
                                   prefix=model.get("continuing_subword_prefix", "##"))
        pooling = _optional_json(files, "1_Pooling/config.json") or {"pooling_mode_mean_tokens": True}
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{files}: only mean pooling is supported")
        st = _optional_json(files, "sentence_bert_config.json") or {}
        config = files.json("config.json")
        self.bert = Bert(read_safetensors(files.read("model.safetensors")), config)
        self.max_length = min(int(st.get("max_seq_length", 256)), self.bert.max_positions)
        modules = _optional_json(files, "modules.json") or []
        self.normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules) \
            or not modules
        self.dim = self.bert.hidden

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t, self.max_length) for t in texts]

    def encode(self, texts: str | Sequence[str], batch_size: int = 32) -> npt.NDArray[np.float32]:
        """(len(texts), dim) float32, one unit vector a text (one text: shape (dim,))."""
        one = isinstance(texts, str)
        items = [texts] if isinstance(texts, str) else list(texts)
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        ids = self.tokenize(items)
        # Longest first, in batches of similar lengths: little padding, so little waste.
        order = sorted(range(len(items)), key=lambda i: -len(ids[i]))
        for lo in range(0, len(order), batch_size):
            rows = order[lo:lo + batch_size]
            out[rows] = self._embed([ids[i] for i in rows])
        return out[0] if one else out

    def _embed(self, batch: list[list[int]]) -> npt.NDArray[np.float32]:
        n = max(len(x) for x in batch)
        ids = np.full((len(batch), n), self.tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), n), dtype=bool)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = True
        hidden = self.bert(ids, mask)
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))
        if self.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
        result: npt.NDArray[np.float32] = pooled.astype(np.float32, copy=False)
        return result


def _optional_json(files: ModelFiles, name: str) -> Any:
    try:
        return files.json(name)
    except FileNotFoundError:
        return None
