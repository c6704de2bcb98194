"""Deployment files: compose.yaml (schema + topology) and the Dockerfile."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SERVICES = ("aquila1", "aquila2", "aquila3")
NODE_PORT = 8470


def _load_compose() -> dict[str, Any]:
    data = YAML(typ="safe").load(COMPOSE.read_text())
    assert isinstance(data, dict), "compose.yaml must be a mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose.get("services")
    assert isinstance(svcs, dict)
    return svcs


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # ["KEY=value", ...] form
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    assert isinstance(env, dict)
    return {str(k): str(v) for k, v in env.items()}


def _container_targets(service: dict[str, Any]) -> list[str]:
    targets: list[str] = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            targets.append(parts[1] if len(parts) >= 2 else parts[0])
        else:
            targets.append(str(vol["target"]))
    return targets


def _published(
    service: dict[str, Any], environ: dict[str, str] | None = None
) -> list[tuple[int, int, str]]:
    """(host port, container port, protocol) for each published port."""
    return [(p, t, proto) for _, p, t, proto in _bindings(service, environ or {})]


def _bindings(service: dict[str, Any], environ: dict[str, str]) -> list[tuple[str, int, int, str]]:
    """(host address, host port, container port, protocol) for each published port, with the
    variables of `environ` substituted; "" for the address means every interface."""
    out: list[tuple[str, int, int, str]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((_interpolate(str(port.get("host_ip", "")), environ),
                        int(port["published"]), int(port["target"]), port.get("protocol", "tcp")))
            continue
        spec, _, proto = _interpolate(str(port), environ).partition("/")
        parts = spec.split(":")
        assert len(parts) >= 2, f"port {port!r} is not published on the host"
        host = ":".join(parts[:-2])
        out.append((host, int(parts[-2]), int(parts[-1]), proto or "tcp"))
    return out


class MissingVariable(Exception):
    pass


_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}$]*))?\}")


def _interpolate(text: str, environ: dict[str, str]) -> str:
    """Compose's variable substitution (the forms used here: `${V}`, `${V:-default}`,
    `${V-default}`, `${V:?error}`, `${V?error}`, `$$`), as `docker compose` applies it."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        value = environ.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op is not None and op.endswith("?") and unset:
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return value or ""

    out = _VAR.sub(sub, text)
    assert "${" not in out, f"substitution compose would not understand in {text!r}"
    return out


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    """Run check-jsonschema with its bundled (offline) compose-spec schema."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_validates_against_compose_spec() -> None:
    proc = _check_jsonschema(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout


def test_schema_check_rejects_unknown_keys(tmp_path: Path) -> None:
    """The validator really checks: an unknown service key must fail."""
    bad = _load_compose()
    bad["services"]["aquila1"]["not_a_compose_key"] = True
    path = tmp_path / "compose.yaml"
    path.write_text(json.dumps(bad))  # JSON is YAML
    proc = _check_jsonschema(path)
    assert proc.returncode != 0
    assert "not_a_compose_key" in proc.stdout + proc.stderr


def test_three_services(services: dict[str, dict[str, Any]]) -> None:
    assert sorted(services) == list(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_service_shape(services: dict[str, dict[str, Any]], name: str) -> None:
    svc = services[name]
    assert svc.get("image") == "aquila:latest"
    assert "build" in svc
    assert "/data" in _container_targets(svc), f"{name}: no volume at /data"
    hc = svc.get("healthcheck")
    assert isinstance(hc, dict) and not hc.get("disable", False)
    test = hc["test"]
    test_text = " ".join(test) if isinstance(test, list) else str(test)
    # /readyz is open to probes (no key), and the image has python but no curl.
    assert "/readyz" in test_text and "urllib" in test_text
    assert isinstance(test, list) and test[:2] == ["CMD", "python"], test
    assert "Authorization" not in test_text
    published = _published(svc)
    assert any(target == NODE_PORT and proto == "tcp" for _, target, proto in published)


def test_named_volumes_are_distinct_and_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    sources = []
    for name in SERVICES:
        for vol in services[name].get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source")
            sources.append(src)
    assert len(set(sources)) == len(SERVICES)
    declared = compose.get("volumes") or {}
    for src in sources:
        assert src in declared, f"volume {src!r} is not a declared named volume"


def test_host_ports(services: dict[str, dict[str, Any]]) -> None:
    host_ports = sorted(p for name in SERVICES for p, _, _ in _published(services[name]))
    assert host_ports == [8470, 8471, 8472]


@pytest.mark.parametrize("name", SERVICES)
def test_published_on_loopback_unless_told(services: dict[str, dict[str, Any]], name: str) -> None:
    """Published on 127.0.0.1 by default; AQUILA_PUBLISH_HOST chooses another address. Only
    the HTTP port: gossip (UDP) stays between the containers."""
    default = _bindings(services[name], {})
    assert default and all(host == "127.0.0.1" for host, _, _, _ in default), default
    assert all(proto == "tcp" for _, _, _, proto in default), default
    told = _bindings(services[name], {"AQUILA_PUBLISH_HOST": "0.0.0.0"})
    assert {host for host, _, _, _ in told} == {"0.0.0.0"}


def test_interpolation_helper_is_compose_s() -> None:
    """The substitution the tests above rely on, on known cases."""
    env = {"SET": "v", "EMPTY": ""}
    assert _interpolate("${SET:-d}:${UNSET:-d}:${EMPTY:-d}:${EMPTY-d}:$$x", env) == "v:d:d::$x"
    assert _interpolate("${SET:?e}${EMPTY?e}", env) == "v"
    with pytest.raises(MissingVariable):
        _interpolate("${EMPTY:?e}", env)
    with pytest.raises(MissingVariable):
        _interpolate("${UNSET?e}", env)


def test_environment(services: dict[str, dict[str, Any]]) -> None:
    envs = {name: _env(services[name]) for name in SERVICES}
    for name, env in envs.items():
        bad = [k for k in env if not k.startswith("AQUILA_")]
        assert not bad, f"{name}: non-AQUILA_ env keys {bad}"
        assert env.get("AQUILA_ADVERTISE") == f"{name}:{NODE_PORT}"
        secret = env.get("AQUILA_CLUSTER_SECRET", "")
        # Required (`:?`): unset or empty, compose refuses to start; no default secret.
        assert secret.startswith("${AQUILA_CLUSTER_SECRET:?"), secret
        assert _interpolate(secret, {"AQUILA_CLUSTER_SECRET": "s3cret"}) == "s3cret"
        for environ in ({}, {"AQUILA_CLUSTER_SECRET": ""}):
            with pytest.raises(MissingVariable, match="AQUILA_CLUSTER_SECRET"):
                _interpolate(secret, environ)
    ids = [envs[name].get("AQUILA_NODE_ID") for name in SERVICES]
    assert all(ids), "every node needs AQUILA_NODE_ID"
    assert len(set(ids)) == len(ids), f"node ids not distinct: {ids}"
    assert "AQUILA_SEEDS" not in envs["aquila1"]


@pytest.mark.parametrize("name", ["aquila2", "aquila3"])
def test_seeded_from_first(services: dict[str, dict[str, Any]], name: str) -> None:
    svc = services[name]
    assert _env(svc).get("AQUILA_SEEDS") == f"aquila1:{NODE_PORT}"
    dep = svc.get("depends_on")
    assert isinstance(dep, dict), "depends_on must use the long form with a condition"
    assert dep["aquila1"]["condition"] == "service_healthy"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    if buf:
        lines.append(buf)
    out = []
    for line in lines:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(args)


def test_dockerfile() -> None:
    instrs = _dockerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for name, args in instrs:
        by_name.setdefault(name, []).append(args)

    assert by_name["FROM"][0].startswith("python:3.11-slim")
    exposed = {tok for args in by_name.get("EXPOSE", []) for tok in args.split()}
    assert {"8470/tcp", "8470/udp"} <= exposed
    assert _exec_form(by_name["ENTRYPOINT"][-1]) == ["aquila"]
    assert _exec_form(by_name["CMD"][-1]) == ["serve"]
    assert any("/data" in args for args in by_name.get("VOLUME", []))
    user = by_name.get("USER", [])
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert any("pip install ." in args for args in by_name.get("RUN", []))
    env_text = " ".join(by_name.get("ENV", []))
    assert "AQUILA_HOST=0.0.0.0" in env_text and "AQUILA_DATA=/data" in env_text
    hc = " ".join(by_name.get("HEALTHCHECK", []))
    assert "urllib" in hc and "/healthz" in hc
