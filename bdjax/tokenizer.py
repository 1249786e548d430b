"""Tokenizer: a `tokenizers` fast tokenizer, its special tokens and chat template.

Read from a Hugging Face directory (tokenizer.json + tokenizer_config.json) or built from GGUF
metadata. Chat templates come from checkpoints, which may come from attackers, so they are
rendered in jinja2's immutable sandbox.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers

from bdjax.errors import TokenizerError


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    backend: tokenizers.Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None

    # ---- ids ----------------------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """The padding id: the pad token, else eos, else 0 (padding is always masked out)."""
        for tok in (self.pad_token, self.eos_token):
            if (i := self.token_id(tok)) is not None:
                return i
        return 0

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render messages ([{"role": ..., "content": ...}]) with the checkpoint's chat template."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template; pass chat=False or use a chat model")
        try:
            template = _jinja_env().from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template failed to render: {e}") from None

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """Token ids of a single-turn chat prompt ending where the assistant's answer begins."""
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": prompt})
        # The template already holds any BOS it wants, as in HF's apply_chat_template(tokenize=True).
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    # ---- files --------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{path} has no tokenizer.json; bdjax reads fast (tokenizers) tokenizers only — "
                                 "convert a sentencepiece tokenizer.model with transformers first")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise TokenizerError(f"{tok_file} could not be read: {e}") from None
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        specials = {}
        if (path / "special_tokens_map.json").is_file():
            specials = json.loads((path / "special_tokens_map.json").read_text())
        token = lambda key: _content(cfg.get(key)) or _content(specials.get(key))
        return cls(backend, template, token("bos_token"), token("eos_token"), token("pad_token"), token("unk_token"))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("pad_token", self.pad_token), ("unk_token", self.unk_token)) if v is not None}
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               "model_max_length": 1_000_000_000, **specials}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def _content(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken serialisation
        return value.get("content")
    return value


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _jinja_env() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
