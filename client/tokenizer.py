"""Text <-> token ids through a checkpoint's tokenizer.json (the `tokenizers` package)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def for_model(cls, model_dir: str | Path) -> TextCodec | None:
        """The checkpoint's tokenizer, or None when the folder has no tokenizer.json."""
        path = Path(model_dir) / "tokenizer.json"
        return cls(Tokenizer.from_file(str(path))) if path.is_file() else None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens=False`` for text that already holds them (a rendered chat template)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
