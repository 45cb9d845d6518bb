"""A checkpoint's chat template: messages -> prompt text, rendered exactly as transformers renders it.

The template comes from the checkpoint folder (``chat_template.jinja``, else the ``chat_template`` key
of ``tokenizer_config.json``, a string or a list of named templates). Templates are untrusted code
(anyone can publish a checkpoint), so they run in Jinja's immutable sandbox, set up as transformers'
``apply_chat_template`` sets it up: trim_blocks and lstrip_blocks, loop controls, the
``raise_exception`` and ``strftime_now`` globals, ``dict`` and ``namespace`` without ways out of the
sandbox, a ``tojson`` that keeps non-ASCII text, and the tokenizer's special tokens (``bos_token``,
``eos_token``...) as variables. The rendered text holds its special tokens as text; encode it
without adding more (``add_special_tokens=False``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# the special tokens transformers passes to a template (its special_tokens_map)
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its ``raise_exception``) or failed to render it."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which no chat template wants
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` for templates: calls and ``fromkeys`` only, no attribute to climb out of the sandbox by."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` for templates, refusing underscore names (a way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's signature, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the underscore name {name!r}")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template_source(value: Any) -> str | None:
    """``chat_template`` is a string, or a list of {"name", "template"} of which "default" is the one."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        """Compile ``source``; a syntax error raises ``ChatTemplateError`` here, not at the first request."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = _TemplateDict()
        env.globals["namespace"] = _TemplateNamespace
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e} (line {e.lineno})") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike[str]) -> ChatTemplate | None:
        """The checkpoint's template, or None when it has none. Malformed JSON raises ValueError."""
        folder = Path(model_dir)
        config_path = folder / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path} is not valid JSON: {e}") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path} does not hold a JSON object")
        jinja_path = folder / "chat_template.jinja"
        source = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else None
        if source is None:
            source = _template_source(config.get("chat_template"))
        if source is None:
            return None
        tokens = {key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key))) is not None}
        return cls(source, tokens)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               **variables: Any) -> str:
        """The prompt text for ``messages`` ([{"role", "content"}, ...]); ``variables`` override the
        special tokens. Keys whose value is None are dropped first, as transformers drops them."""
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            # tools and documents are None unless given, as in transformers (`tools is none` checks)
            return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                         **{"tools": None, "documents": None, **self.special_tokens, **variables})
        except jinja2.TemplateError as e:  # raise_exception(), undefined calls, sandbox violations
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on the conversation: {e}") from None
