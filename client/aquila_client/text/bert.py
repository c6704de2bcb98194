"""The BERT encoder's forward pass in numpy (float32), inference only: embeddings, then per
layer multi-head self-attention and a GELU feed-forward block, each with a residual and
LayerNorm (post-norm, as BertModel). Padding is masked out of attention.

The weights are PyTorch's (`Linear.weight` is out × in); they are transposed once at load so
every product is a plain row-major matmul over all the batch's tokens at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

# Abramowitz & Stegun 7.1.26: |error| < 1.5e-7, well inside float32 noise. BERT's GELU is the
# exact erf form, not the tanh approximation (which differs by up to ~1e-3).
_P = np.float32(0.3275911)
_A = [np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)]


def erf(x: F32) -> F32:
    """erf(x), elementwise; in place on temporaries (this runs over every hidden unit of every
    token of every layer, and memory traffic is what it costs)."""
    a = np.abs(x)
    t = a * _P
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    poly = t * _A[4]
    for c in (_A[3], _A[2], _A[1], _A[0]):
        poly += c
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(np.float32(1.0), poly, out=poly)
    np.copysign(poly, x, out=poly)
    return poly


def gelu(x: F32) -> F32:
    """0.5·x·(1 + erf(x/√2)), overwriting `x`'s temporaries, not `x` itself."""
    y = erf(x * np.float32(1 / math.sqrt(2)))
    y += np.float32(1.0)
    y *= x
    y *= np.float32(0.5)
    return y


def layer_norm(x: F32, w: F32, b: F32, eps: float) -> F32:
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    out: F32 = (x - mean) / np.sqrt(var + np.float32(eps)) * w + b
    return out


@dataclass(frozen=True)
class Layer:
    qkv_w: F32  # hidden × 3·hidden: query, key and value in one product
    qkv_b: F32
    out_w: F32
    out_b: F32
    ln1_w: F32
    ln1_b: F32
    up_w: F32  # hidden × intermediate
    up_b: F32
    down_w: F32  # intermediate × hidden
    down_b: F32
    ln2_w: F32
    ln2_b: F32


class Bert:
    def __init__(self, tensors: dict[str, npt.NDArray[Any]], config: dict[str, Any]) -> None:
        def get(name: str) -> F32:
            for key in (name, "bert." + name):
                if key in tensors:
                    return np.ascontiguousarray(tensors[key], dtype=np.float32)
            raise KeyError(f"the weights have no {name}")

        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"activation {config.get('hidden_act')!r} is not supported")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.max_positions = int(config.get("max_position_embeddings", 512))
        self.word = get("embeddings.word_embeddings.weight")
        # Token type 0 for every token of a single sentence: folded into the positions.
        self.pos = get("embeddings.position_embeddings.weight") + get(
            "embeddings.token_type_embeddings.weight")[0]
        self.emb_ln = (get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            self.layers.append(Layer(
                qkv_w=np.ascontiguousarray(np.concatenate(
                    [get(att + f"self.{n}.weight") for n in ("query", "key", "value")]).T),
                qkv_b=np.concatenate([get(att + f"self.{n}.bias")
                                      for n in ("query", "key", "value")]),
                out_w=np.ascontiguousarray(get(att + "output.dense.weight").T),
                out_b=get(att + "output.dense.bias"),
                ln1_w=get(att + "output.LayerNorm.weight"),
                ln1_b=get(att + "output.LayerNorm.bias"),
                up_w=np.ascontiguousarray(get(p + "intermediate.dense.weight").T),
                up_b=get(p + "intermediate.dense.bias"),
                down_w=np.ascontiguousarray(get(p + "output.dense.weight").T),
                down_b=get(p + "output.dense.bias"),
                ln2_w=get(p + "output.LayerNorm.weight"),
                ln2_b=get(p + "output.LayerNorm.bias"),
            ))

    def __call__(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.bool_]) -> F32:
        """Last hidden states (batch × length × hidden) for padded `ids` and their `mask`."""
        b, n = ids.shape
        if n > self.max_positions:
            raise ValueError(f"{n} tokens exceed the model's {self.max_positions} positions")
        h, nh = self.hidden, self.heads
        d = h // nh
        x = layer_norm(self.word[ids] + self.pos[:n], *self.emb_ln, self.eps).reshape(b * n, h)
        # Padded keys get the lowest float, as BertModel does: exp() of it is exactly zero.
        bias = np.where(mask, np.float32(0), np.finfo(np.float32).min)[:, None, None, :]
        scale = np.float32(1 / math.sqrt(d))
        for layer in self.layers:
            qkv = (x @ layer.qkv_w + layer.qkv_b).reshape(b, n, 3, nh, d).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # each batch × heads × length × d
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(b * n, h)
            x = layer_norm(ctx @ layer.out_w + layer.out_b + x, layer.ln1_w, layer.ln1_b, self.eps)
            up = gelu(x @ layer.up_w + layer.up_b)
            x = layer_norm(up @ layer.down_w + layer.down_b + x, layer.ln2_w, layer.ln2_b,
                           self.eps)
        out: F32 = x.reshape(b, n, h)
        return out
