"""A GGUF file -> an ordinary float32 checkpoint directory (safetensors, fast tokenizer, chat template, configs).

transformers reads and dequantizes the GGUF (`gguf_file=`); torch and transformers are imported only when a
conversion runs, so the module itself is torch-free.
"""

from __future__ import annotations

import copy
import os

from tsukimi.model.spec import SUPPORTED_MODEL_TYPES

_NUM_STEPS = 4


class ConversionError(Exception):
    """The GGUF cannot be converted (unreadable, or an architecture tsukimi does not serve); the message says why."""


def gguf_architecture(path: str) -> str:
    """The file's `general.architecture` (e.g. "llama"), read from its header without loading tensors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # NOTE: the reader raises ValueError, struct errors, OSError... on a bad file.
        raise ConversionError(f"{os.path.basename(path)} is not a readable GGUF file ({exc})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ConversionError(f"{os.path.basename(path)} has no general.architecture in its header")
    return str(field.contents())


def check_architecture(path: str) -> str:
    """The file's architecture; raises ConversionError when tsukimi cannot serve it."""
    architecture = gguf_architecture(path)
    if architecture not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"{os.path.basename(path)} is a {architecture!r} model; tsukimi serves "
                              f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} models")
    return architecture


def convert_gguf(path: str, out_dir: str, *, label: str | None = None, is_progress_shown: bool = True) -> None:
    """Writes `path`'s model into `out_dir` as a float32 checkpoint that loads without `gguf_file=` and gives the
    same greedy tokens as the GGUF loaded by transformers. Raises ConversionError."""
    check_architecture(path)
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    with tqdm(total=_NUM_STEPS, desc=f"convert {label or name}", unit="step", disable=not is_progress_shown) as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update()
        bar.set_postfix_str("dequantize")
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str("float32 copy")
        model = _plain_model(quantized)
        del quantized
        bar.update()
        bar.set_postfix_str("save")
        model.save_pretrained(out_dir)
        # NOTE: save_jinja_files=False keeps the chat template inside tokenizer_config.json, where other servers
        # (and older transformers) look for it, instead of a separate chat_template.jinja.
        tokenizer.save_pretrained(out_dir, save_jinja_files=False)
        bar.update()
    if not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        raise ConversionError(f"{name}: transformers wrote no tokenizer.json (a fast tokenizer is required)")


def _plain_model(quantized):
    """The same weights in an ordinary model: transformers refuses to save a model loaded through its GGUF
    quantizer, even a fully dequantized one."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=next(quantized.parameters()).dtype)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(quantized.generation_config)
    return model.eval()
