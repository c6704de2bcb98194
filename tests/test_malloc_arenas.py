"""The node's threads share `heap.ARENAS` glibc arenas (node/storage/heap.py): left alone,
glibc makes up to eight a core, each keeping what its threads freed."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from aquila.node.storage.heap import ARENAS, malloc_info

_SCRIPT = textwrap.dedent("""
    import threading
    from aquila.node.storage.heap import limit_arenas, malloc_info

    limit_arenas()
    kept = []
    go = threading.Barrier(4)

    def work():
        go.wait()  # every thread alive at once: each would get an arena of its own
        kept.append([bytearray(4096) for _ in range(64)])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(malloc_info().count("<heap nr="))
""")


@pytest.mark.skipif(not malloc_info(), reason="glibc's malloc_info only")
def test_threads_share_the_nodes_few_malloc_arenas() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == ARENAS < 4


def test_malloc_info_lists_the_arenas() -> None:
    text = malloc_info()
    if not text:
        pytest.skip("glibc's malloc_info only")
    assert text.startswith("<malloc") and re.search(r'<heap nr="0">', text)
