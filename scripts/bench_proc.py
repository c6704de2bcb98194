"""Running a C load generator (wrk, pgbench) as a child with its own CPU time, and the CPU time
of a server process tree from /proc: what the reference benchmarks share.

The load generators share the machine's cores with the server they measure, so every figure
comes with how many cores each side used."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.05


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    cpu_s: float  # user + system of the child itself (from wait4)


def run_measured(
    cmd: Sequence[str],
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    out_dir: Path,
    name: str,
) -> Finished:
    """Run cmd to completion with stdout/stderr in out_dir/name.{out,err} (a pipe could fill
    and stall a chatty child); its CPU seconds come from wait4, so threads elsewhere in this
    process do not blur them. Killed (and reported as failed) after timeout_s."""
    out_path, err_path = out_dir / f"{name}.out", out_dir / f"{name}.err"
    t0 = time.perf_counter()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=None if env is None else dict(env),
            cwd=None if cwd is None else str(cwd),
            start_new_session=True,
        )
        deadline = t0 + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(POLL_S)
    # Popen must not wait for the pid again: it is reaped.
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Finished(
        returncode=proc.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        seconds=time.perf_counter() - t0,
        cpu_s=usage.ru_utime + usage.ru_stime,
    )


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its reaped children (cutime, cstime) and its live children:
    PostgreSQL's backends are children of the postmaster and exit with their connections, so
    the sum stays right across connects and disconnects. NaN when the process is gone."""
    tck = os.sysconf("SC_CLK_TCK")
    try:
        f = _stat_fields(pid)
    except (OSError, ValueError):
        return float("nan")
    # Fields after the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    total = sum(int(x) for x in f[11:15])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        try:
            c = _stat_fields(int(entry.name))
        except (OSError, ValueError):
            continue  # exited meanwhile: counted in the parent's cutime once reaped
        if int(c[1]) == pid:
            total += int(c[11]) + int(c[12])
    return total / tck


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq, steal) since boot,
    from /proc/stat. Over a point, busy − server − load generator = what other processes
    took: on a shared machine that is the noise in the figure."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
