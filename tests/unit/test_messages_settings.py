"""Bus messages and settings: round trips, refusals, validation."""

import msgspec
import pytest
from pydantic import ValidationError

from tsukimi.common.messages import (
    SCHEMA_VERSION, DecodeStatus, GenerateRequest, Heartbeat, SamplingParams, TokenEvent, decode, encode,
)
from tsukimi.common.settings import Settings


def test_roundtrip_and_foreign_payloads():
    req = GenerateRequest(request_id="r1", model="demo", prompt_token_ids=[1, 2, 3],
                          sampling=SamplingParams(temperature=0.5, seed=9, stop_token_ids=[256]), arrival_time=1.5)
    assert decode(encode(req), GenerateRequest) == req
    with pytest.raises(msgspec.ValidationError):
        decode(encode(Heartbeat(instance_id="x", status=DecodeStatus())), GenerateRequest)
    with pytest.raises(msgspec.DecodeError):
        decode(b"\xff\x00garbage", TokenEvent)
    newer = TokenEvent(request_id="r", index=0, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(msgspec.ValidationError, match="newer"):
        decode(encode(newer), TokenEvent)


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TSUKIMI_GATEWAY_PORT", "9000")
    monkeypatch.setenv("TSUKIMI_LOG_LEVEL", "debug")
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("TSUKIMI_MODEL", str(tmp_path))
    s = Settings()
    assert s.gateway_port == 9000 and s.log_level == "DEBUG" and s.model == str(tmp_path)
    assert s.model_name() == tmp_path.name
    assert s.instance_name("decode").startswith("decode-")


@pytest.mark.parametrize("env", [
    {"TSUKIMI_GATEWAY_PORT": "70000"}, {"TSUKIMI_MODEL": "/does/not/exist"}, {"TSUKIMI_LOG_LEVEL": "LOUD"},
    {"TSUKIMI_HEARTBEAT_INTERVAL_S": "0"}, {"TSUKIMI_MAX_BATCH_SIZE": "zero"},
])
def test_settings_refuse_bad_values(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("service", ["prefill", "decode"])
def test_workers_refuse_to_start_without_a_cluster_secret(service):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TSUKIMI_CLUSTER_SECRET"}
    env["TSUKIMI_NATS_URL"] = "nats://127.0.0.1:1"
    done = subprocess.run([sys.executable, "-m", "tsukimi", service], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "TSUKIMI_CLUSTER_SECRET is not set" in done.stderr and "Traceback" not in done.stderr
