"""Model inputs from text, built exactly as the on-device runtime builds them.

The exporter calibrates and validates with the runtime's own tokenizer, padding and pooling
(`runtime.model`), so what was measured at export time is what runs on the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from runtime.model import ort_session, pad_batch, pool
from runtime.tokenizer import Tokenizer

__all__ = ["encoder_feeds", "ort_session", "pad_batch", "pool"]


def encoder_feeds(tokenizer_json: Path, texts: Sequence[str], session, *, max_length: int,
                  batch_size: int = 1) -> Iterator[dict]:
    """Int64 feeds for `session`'s inputs, `batch_size` texts at a time, in text order.

    batch_size=1 gives each text at its natural length (no padding), which is what
    calibration wants: padded positions would widen activation ranges with values that the
    attention mask discards anyway.
    """
    tokenizer = Tokenizer.from_file(tokenizer_json)
    names = [i.name for i in session.get_inputs()]
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        ids = tokenizer.encode_batch(chunk, max_length=max_length)
        yield pad_batch(ids, pad_id=tokenizer.pad_id, input_names=names)

