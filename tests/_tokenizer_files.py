"""What the tokenizer test files share: a tokenizer.json written with edits, and HF's
reading of one (the reference every test compares with)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write(tmp: Path, data: dict, *edits: Callable[[dict], None]) -> Path:
    """`data` with each of `edits` applied to a copy, as tmp/tokenizer.json."""
    data = json.loads(json.dumps(data))
    for edit in edits:
        edit(data)
    path = tmp / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def hf_tokenizer(path: Path):
    """Hugging Face `tokenizers`' Tokenizer of `path`, without padding or truncation (as
    runtime.Tokenizer reads a file)."""
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(str(path))
    hf.no_padding()
    hf.no_truncation()
    return hf
