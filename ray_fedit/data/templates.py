"""Prompt formatting: the model's chat template, or the paper's Alpaca template.

Training needs the prompt and the full text separately so that the loss covers response tokens only;
both formats are built so that ``full == prompt + response + eos`` holds at the text level.
"""

from __future__ import annotations

from typing import Any, Literal

Template = Literal["chat", "alpaca"]

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(tokenizer: Any, instruction: str, template: Template) -> str:
    """The text a model sees before it answers ``instruction``."""
    if template == "alpaca":
        return ALPACA.format(instruction=instruction)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("data.template='chat' but the tokenizer has no chat template; "
                         "use data.template=alpaca")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def format_example(tokenizer: Any, instruction: str, response: str,
                   template: Template) -> tuple[str, str]:
    """``(prompt, full_text)`` of one training example; the response ends with the EOS token."""
    prompt = format_prompt(tokenizer, instruction, template)
    return prompt, prompt + response + (tokenizer.eos_token or "")
