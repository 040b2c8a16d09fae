"""Chat templates: the checkpoint's own jinja template, or tsukimi's documented plain template."""

from __future__ import annotations

from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The plain template used when a model has none (the demo model): each message on its own lines,
# then the assistant's header, e.g.
#   <|system|>\nYou are terse.\n<|user|>\nHi\n<|assistant|>\n
PLAIN_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class TemplateError(ValueError):
    """The conversation cannot be rendered (the template raised, or a message is malformed)."""


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    """Renders a list of `{"role", "content"}` messages to prompt text, as transformers' apply_chat_template."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self._template = env.from_string(source)
        self._special_tokens = special_tokens or {}

    @classmethod
    def plain(cls) -> "ChatTemplate":
        """tsukimi's documented template for models without one."""
        return cls(PLAIN_TEMPLATE)

    def render(self, messages: list[dict]) -> str:
        """Prompt text for `messages` followed by the assistant's generation prompt."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._special_tokens)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
