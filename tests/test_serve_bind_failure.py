"""`aquila serve` that cannot bind its port (another process holds it) exits with code 1. The
start had opened the collections by then, and one not trained yet starts its training at
the open: the bind error returned from `serve`, and Python's exit then waited for the
training's thread (k-means, an hour at 10M vectors) before the process ended."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.parametrize("abandoned", [True, False])
def test_serve_that_cannot_bind_does_not_wait_for_a_training(
        abandoned: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import uvloop

    from aquila.node import cli, logs
    from aquila.node.config import NodeConfig

    def in_use(coro: Any) -> None:
        coro.close()
        raise OSError(98, "Address already in use")

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(uvloop, "install", lambda: None)
    monkeypatch.setattr(logs, "configure", lambda *a: None)
    monkeypatch.setattr(asyncio, "run", in_use)
    monkeypatch.setattr(cli, "_abandoned_background", lambda: abandoned)
    monkeypatch.setattr(os, "_exit", exit_now)
    config = NodeConfig(data_dir=tmp_path).validate()
    if abandoned:
        with pytest.raises(SystemExit) as stop:
            cli.serve(config)
        assert stop.value.code == 1
    else:
        assert cli.serve(config) == 1
    assert "Address already in use" in capsys.readouterr().err
