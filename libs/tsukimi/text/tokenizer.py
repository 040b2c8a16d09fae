"""Text <-> token ids for a served model, without torch or transformers (the gateway uses it).

Built on the `tokenizers` library (the Rust tokenizer behind Hugging Face's fast tokenizers) and jinja2 for
chat templates, so any checkpoint with a `tokenizer.json` works the same way transformers would tokenize it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tsukimi.text.chat_splice import KnownIds, encode_chat_spliced
from tsukimi.text.chat_template import ChatTemplate

DEMO_EOS = "<|endoftext|>"
DEMO_VOCAB_SIZE = 257


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_demo_tokenizer() -> Tokenizer:
    """Byte-level tokenizer of the demo model: token id = byte value (0..255), 256 = end of text."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab[DEMO_EOS] = 256
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([DEMO_EOS])
    return tokenizer


def save_demo_tokenizer(directory: str, chat_template: str | None = None) -> None:
    """Write the demo tokenizer as Hugging Face files (`tokenizer.json`, `tokenizer_config.json`)."""
    build_demo_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": DEMO_EOS,
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


@dataclass
class TextTokenizer:
    """Encodes prompts, renders chat messages, decodes output for one served model."""

    tokenizer: Tokenizer
    # Token ids that end generation.
    eos_token_ids: list[int]
    # Prompt + output tokens the model takes.
    max_model_len: int
    chat_template: ChatTemplate
    # Token prepended to every prompt (Llama-style BOS), when the checkpoint asks for one.
    bos_token_id: int | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, model: str) -> "TextTokenizer":
        """Tokenizer for "demo" or for a checkpoint directory (needs its `tokenizer.json`)."""
        if model == "demo":
            from tsukimi.model.spec import DEMO_CONFIG

            return cls(
                tokenizer=build_demo_tokenizer(),
                eos_token_ids=[256],
                max_model_len=DEMO_CONFIG["max_position_embeddings"],
                chat_template=ChatTemplate.plain(),
            )
        path = os.path.join(model, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{model} has no tokenizer.json (a fast tokenizer is required)")
        tokenizer = Tokenizer.from_file(path)
        tok_config = _read_json(os.path.join(model, "tokenizer_config.json"))
        model_config = _read_json(os.path.join(model, "config.json"))
        gen_config = _read_json(os.path.join(model, "generation_config.json"))
        specials = {
            name: _token_text(tok_config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if tok_config.get(name)
        }
        eos_ids = _as_list(gen_config.get("eos_token_id", model_config.get("eos_token_id")))
        if not eos_ids and "eos_token" in specials:
            eos_id = tokenizer.token_to_id(specials["eos_token"])
            eos_ids = [eos_id] if eos_id is not None else []
        bos_id = None
        if tok_config.get("add_bos_token") and "bos_token" in specials:
            bos_id = tokenizer.token_to_id(specials["bos_token"])
        template = tok_config.get("chat_template")
        if template is None and os.path.exists(os.path.join(model, "chat_template.jinja")):
            with open(os.path.join(model, "chat_template.jinja")) as f:
                template = f.read()
        return cls(
            tokenizer=tokenizer,
            eos_token_ids=eos_ids,
            max_model_len=int(model_config.get("max_position_embeddings", 2048)),
            chat_template=ChatTemplate(template, specials) if template else ChatTemplate.plain(),
            bos_token_id=bos_id,
            special_tokens=specials,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; adds the BOS token when the checkpoint does and the text lacks it."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_chat(self, messages: list[dict], known_ids: KnownIds | None = None) -> list[int]:
        """Token ids of a conversation rendered by the chat template, ready for the assistant's turn.

        `known_ids` gives the token ids of assistant contents the model generated, spliced in where that is exact
        (see `chat_splice`).
        """
        # NOTE: templates write their own BOS text; encoding adds none to avoid a doubled BOS.
        if known_ids is not None:
            return encode_chat_spliced(self.chat_template, self._encode_batch, messages, known_ids)
        return self.encode(self.chat_template.render(messages), add_special_tokens=False)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids`, special tokens dropped."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_token_ids(self) -> list[int]:
        """Ids of the special tokens (end of text, chat markers, ...), ascending."""
        return sorted(i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
