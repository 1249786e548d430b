"""The one prompt template used for both fine-tuning and evaluation.

A `Template` renders (instruction, input text) as a user turn through the tokenizer's chat
template, and a class label as the assistant's answer. It exposes the rendered pieces around
the input text so that poisoning can insert a trigger into the input on token arrays, and the
training and evaluation prompts are built from the very same pieces (a peer benchmark whose
train and eval prompts differed reported ASRs 30 points off).
"""

from __future__ import annotations

import dataclasses

from bdjax.errors import ConfigError
from bdjax.tokenizer import Tokenizer

_SLOT = "\u2063INPUT\u2063"  # invisible separators: cannot occur in an instruction by accident
_ANSWER = "\u2063ANSWER\u2063"
PLAIN_FORMAT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclasses.dataclass(frozen=True)
class Template:
    instruction: str
    labels: tuple[str, ...]  # class names, in class-index order
    responses: tuple[str, ...] | None = None  # the answer text per label (default: the label itself)
    system: str | None = None  # None: the chat template's default system prompt
    chat: bool = True  # False: the plain Alpaca-style format above

    def __post_init__(self):
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"template.labels={self.labels} must name at least two distinct classes")
        if self.responses is not None and len(self.responses) != len(self.labels):
            raise ConfigError("template.responses must give one answer per label")

    def answer(self, label: int) -> str:
        return (self.responses or self.labels)[label]

    def label_index(self, name: str) -> int:
        if name not in self.labels:
            raise ConfigError(f"label {name!r} is not among the template's labels {self.labels}")
        return self.labels.index(name)

    def render(self, tokenizer: Tokenizer, text: str = _SLOT, answer: str | None = None) -> str:
        """The prompt text (ending where the answer begins), or prompt + answer + end of turn."""
        user = f"{self.instruction}\n{text}"
        if not self.chat or tokenizer.chat_template is None:
            prompt = PLAIN_FORMAT.format(instruction=self.instruction, input=text)
            return prompt if answer is None else prompt + answer + (tokenizer.eos_token or "")
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else [])
        messages.append({"role": "user", "content": user})
        if answer is None:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                             add_generation_prompt=False)

    def answer_affixes(self, tokenizer: Tokenizer) -> tuple[str, str]:
        """(text before an answer, text closing it) as the template renders any answer."""
        _, _, answers = dataclasses.replace(self, responses=(_ANSWER,) * len(self.labels)).pieces(tokenizer)
        head, closing = answers[0].split(_ANSWER)
        return head, closing

    def pieces(self, tokenizer: Tokenizer) -> tuple[str, str, list[str]]:
        """(text before the input, text after the input up to the answer, full answer per label).

        An answer ends with the end-of-turn token when the chat template closes turns with the
        tokenizer's eos (ChatML's <|im_end|>), so the model learns to stop after it."""
        prompt = self.render(tokenizer)
        if prompt.count(_SLOT) != 1:
            raise ConfigError("the chat template does not place the user message verbatim; use template.chat=False")
        before, after = prompt.split(_SLOT)
        full = self.render(tokenizer, answer=_ANSWER)
        if not full.startswith(prompt):
            raise ConfigError("the chat template renders the prompt differently with and without an answer; "
                              "use template.chat=False")
        tail = full[len(prompt):]
        eos = tokenizer.eos_token or ""
        end = tail[tail.index(_ANSWER) + len(_ANSWER):]
        closing = end[:end.index(eos) + len(eos)] if eos and eos in end else ""
        answers = [tail[:tail.index(_ANSWER)] + self.answer(i) + closing for i in range(len(self.labels))]
        return before, after, answers
