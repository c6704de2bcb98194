"""The README's first examples run as written, in the order a new user meets them: the curl
requests of "Using it", then the Python client's example of "Python", against one real node
(the same collection names, so that the two examples do not collide)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import Node

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_ADDR = "127.0.0.1:8470"


def block_after(heading: str, lang: str) -> str:
    """The first ```lang block after the line `heading`."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {lang} block after {heading!r}"
    return match.group(1)


def curl_requests(block: str) -> list[tuple[str, str, bytes | None]]:
    """(method, path and query, body) of each curl command of the block."""
    words = shlex.split(block, comments=True)
    out: list[tuple[str, str, bytes | None]] = []
    while words:
        assert words[0] == "curl", words
        end = words.index("curl", 1) if "curl" in words[1:] else len(words)
        cmd, words = words[1:end], words[end:]
        method, url, body = "GET", "", None
        i = 0
        while i < len(cmd):
            if cmd[i].startswith("-X"):
                method = cmd[i][2:]
            elif cmd[i] == "-d":
                body, i = cmd[i + 1].encode(), i + 1
            else:
                url = cmd[i]
            i += 1
        assert url.startswith("localhost:8470/"), url
        out.append((method if body is None or method != "GET" else "POST",
                    url[len("localhost:8470"):], body))
    return out


async def test_the_readmes_curl_requests_then_its_python_example(node: Node) -> None:
    requests = curl_requests(block_after("## Using it", "sh"))
    assert len(requests) == 7
    answers: list[Any] = []
    for method, path, body in requests:
        resp = await node.client.request(method, path, data=body,
                                         headers={"Content-Type": "application/json"})
        answer = await resp.json()
        assert resp.status in (200, 201), (method, path, answer)
        answers.append(answer)
    assert [h["id"] for h in answers[2]["results"][0]] == ["a"]  # the filtered search
    assert answers[3]["id"] == "a" and answers[3]["vector"] == [1, 0, 0, 0]

    code = block_after("## Python", "python")
    assert DEFAULT_ADDR in code
    code = code.replace(DEFAULT_ADDR, f"127.0.0.1:{node.config.port}")
    printed = io.StringIO()

    def run() -> None:  # the client is synchronous: off the loop that serves the node
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})

    await asyncio.to_thread(run)
    ids, count = printed.getvalue().rsplit(" ", 1)
    assert count.strip() == "3" and sorted(orjson.loads(ids.replace("'", '"'))) == ["b", "c"]
