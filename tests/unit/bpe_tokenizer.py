"""A small real byte-level BPE tokenizer with a ChatML template, trained in memory (no hub): like SmolLM2's, its
vocabulary has a "\\n\\n" token that re-encoding "a\\n\\nb" does not give back (the pre-tokenizer splits it)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tsukimi.text.chat_template import ChatTemplate
from tsukimi.text.tokenizer import TextTokenizer

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAINING_TEXT = (
    "Hello there.\n\n The answer is here.\n\n And the world turns.\n\n  Hello world again, hello there!\n"
    "user assistant system: what is the answer? Sure, here it is.\n\n The end."
)


def build_bpe(template: str = CHATML) -> TextTokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TRAINING_TEXT] * 20, trainer)
    return TextTokenizer(
        tokenizer=tokenizer,
        eos_token_ids=[tokenizer.token_to_id("<|im_end|>")],
        max_model_len=4096,
        chat_template=ChatTemplate(template),
    )
