"""Shared fixtures: a real NATS server on a random port (a container when Docker works, else the local binary)."""

from __future__ import annotations

import pytest

from tsukimi.common.natsserver import NatsServer


def _docker_nats():
    """A NATS container through testcontainers, or None when no Docker engine is reachable."""
    try:
        import docker
        from testcontainers.core.container import DockerContainer

        docker.from_env().ping()
    except Exception:
        return None
    container = DockerContainer("nats:2.10").with_command("-js").with_exposed_ports(4222)
    container.start()
    return container


@pytest.fixture(scope="session")
def nats_url():
    """URL of a NATS server with JetStream that lives for the test session."""
    container = _docker_nats()
    if container is not None:
        try:
            yield f"nats://{container.get_container_host_ip()}:{container.get_exposed_port(4222)}"
        finally:
            container.stop()
        return
    with NatsServer() as server:
        yield server.url
