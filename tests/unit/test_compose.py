"""Static checks of docker-compose.yml and deploy/*.Dockerfile (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from tsukimi.cli import SERVICES
from tsukimi.common.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])

# The one extra each service's image installs.
SERVICE_EXTRA = {
    "gateway": "gateway",
    "conductor": "conductor",
    "cachestore": "cachestore",
    "prefill": "worker",
    "decode": "worker",
}
# Extras that pull torch/transformers in (directly or through `all`).
HEAVY_EXTRAS = {"worker", "all", "test"}


def _built_services() -> dict[str, dict]:
    """Compose services built from a deploy/ Dockerfile."""
    return {
        name: svc
        for name, svc in COMPOSE["services"].items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile", "").startswith("deploy/")
    }


def _env(svc: dict) -> dict[str, str]:
    """A compose service's environment as a dict of strings (accepts the mapping and the list form)."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _dockerfile(svc: dict) -> str:
    return (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).read_text()


def _instructions(text: str, keyword: str) -> list[str]:
    """Arguments of every `keyword` instruction, with line continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    return [m.group(1).strip() for m in re.finditer(rf"^{keyword}\s+(.*)$", joined, re.MULTILINE)]


def _installed_extras(text: str) -> set[str]:
    """Extras named in `pip install .[a,b]` lines."""
    extras: set[str] = set()
    for run in _instructions(text, "RUN"):
        if "pip install" in run:
            for group in re.findall(r"\.\[([\w,\s-]+)\]", run):
                extras |= {e.strip() for e in group.split(",")}
    return extras


def _dockerfile_env(text: str) -> dict[str, str]:
    """`ENV KEY=VALUE ...` pairs of a Dockerfile."""
    env: dict[str, str] = {}
    for line in _instructions(text, "ENV"):
        env.update(pair.split("=", 1) for pair in line.split())
    return env


def _validate_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Builds Settings from exactly these TSUKIMI_* variables."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key == f"{ENV_PREFIX}MODEL" and value != "demo":
            continue  # a checkpoint path exists only inside the container
        monkeypatch.setenv(key, value)
    return Settings()


def test_every_tsukimi_service_is_in_compose() -> None:
    assert set(_built_services()) == set(SERVICES)
    assert {"nats", "postgres"} <= set(COMPOSE["services"])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dockerfile_runs_its_service(name: str) -> None:
    svc = _built_services()[name]
    assert svc["build"]["dockerfile"] == f"deploy/{name}.Dockerfile"
    text = _dockerfile(svc)
    (cmd,) = _instructions(text, "CMD")
    argv = json.loads(cmd)
    assert argv[0] == "tsukimi" and argv[1] in SERVICES and argv[1] == name


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dockerfile_installs_only_its_extra(name: str) -> None:
    text = _dockerfile(_built_services()[name])
    extras = _installed_extras(text)
    assert extras == {SERVICE_EXTRA[name]}
    assert extras <= EXTRAS
    if SERVICE_EXTRA[name] == "worker":
        assert "download.pytorch.org/whl/cpu" in text  # the CPU torch build, not the CUDA one
    else:
        assert not extras & HEAVY_EXTRAS
        runs = " ".join(_instructions(text, "RUN")).lower()
        assert "torch" not in runs and "transformers" not in runs


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_env_vars_are_real_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = _built_services()[name]
    compose_env = _env(svc)
    image_env = {k: v for k, v in _dockerfile_env(_dockerfile(svc)).items() if k.startswith(ENV_PREFIX)}
    fields = set(Settings.model_fields)
    for key in {**image_env, **compose_env}:
        assert key.startswith(ENV_PREFIX), f"{name}: {key} is not a TSUKIMI_* variable"
        assert key.removeprefix(ENV_PREFIX).lower() in fields, f"{name}: {key} is not a Settings field"
    _validate_settings(image_env, monkeypatch)
    settings = _validate_settings({**image_env, **compose_env}, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.nats_url == "nats://nats:4222"


def _health_port(svc: dict) -> int:
    test = " ".join(svc["healthcheck"]["test"])
    match = re.search(r"http://[^/:]+:(\d+)/health", test)
    assert match, f"healthcheck does not hit /health: {test}"
    return int(match.group(1))


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_healthcheck_hits_the_configured_port(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = _built_services()[name]
    settings = _validate_settings(_env(svc), monkeypatch)
    expected = settings.gateway_port if name == "gateway" else settings.metrics_port
    assert expected != 0
    assert _health_port(svc) == expected
    assert "curl" not in " ".join(svc["healthcheck"]["test"])  # python:3.11-slim has no curl


def test_gateway_publishes_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = COMPOSE["services"]["gateway"]
    settings = _validate_settings(_env(svc), monkeypatch)
    container_ports = {int(str(p).split(":")[-1]) for p in svc["ports"]}
    assert settings.gateway_port in container_ports


def test_service_ports_are_exposed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every port a service listens on is declared in compose and EXPOSEd by its image."""
    for name, svc in _built_services().items():
        settings = _validate_settings(_env(svc), monkeypatch)
        wanted = {"gateway": {settings.gateway_port}}.get(name, {settings.metrics_port})
        if name == "decode":
            wanted.add(settings.kv_port)
        if name == "cachestore":
            wanted.add(settings.cachestore_grpc_port)
            assert settings.cachestore_lane_port > 0, "a fixed session lane port, to expose"
            wanted.add(settings.cachestore_lane_port)
        published = {int(str(p).split(":")[-1]) for p in svc.get("ports", [])}
        declared = published | {int(p) for p in svc.get("expose", [])}
        image = {int(p) for line in _instructions(_dockerfile(svc), "EXPOSE") for p in line.split()}
        assert wanted <= declared, name
        assert wanted <= image, name


def test_conductor_can_reach_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = COMPOSE["services"]["conductor"]
    settings = _validate_settings(_env(svc), monkeypatch)
    if settings.database_url.startswith("postgresql"):
        assert "psycopg" in _dockerfile(svc)  # a driver for the URL
        depends = svc["depends_on"]
        assert "postgres" in depends and "nats" in depends


def test_workers_depend_on_nats() -> None:
    for name, svc in _built_services().items():
        assert "nats" in svc["depends_on"], name


def test_decode_advertises_a_reachable_kv_host(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _validate_settings(_env(COMPOSE["services"]["decode"]), monkeypatch)
    assert settings.kv_host not in {"0.0.0.0", "127.0.0.1", "localhost"}
    assert settings.kv_host in COMPOSE["services"]  # a compose DNS name
    assert settings.kv_port != 0
