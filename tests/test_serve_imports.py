"""`aquila serve` leaves the admin and import commands' modules out of the node (and `rich`,
which they print with: 2.5 MiB of a serving node's resident memory); the other commands and
`--help` still have them."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from aquila.node.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(code, "rich" in sys.modules, "aquila.cluster.admin" in sys.modules)
"""


def _run(*argv: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.split()[-3:]


def test_serve_does_not_import_the_admin_commands() -> None:
    # A bad setting: `serve` stops at its configuration, after the parsing.
    assert _run("serve", "--port", "99999999") == ["2", "False", "False"]


def test_other_commands_still_parse() -> None:
    code, has_rich, has_admin = _run("--help")
    assert (code, has_rich, has_admin) == ("0", "True", "True")
