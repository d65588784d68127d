"""Model inputs from text, built exactly as the on-device runtime builds them.

The exporter calibrates and validates with the runtime's own tokenizer, padding and pooling
(`runtime.model`), so what was measured at export time is what runs on the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from runtime.model import batches, ort_session, pad_batch, pool, usable_cores
from runtime.tokenizer import Tokenizer

__all__ = ["encoder_batches", "encoder_feeds", "host_threads", "ort_session", "pad_batch",
           "pool"]


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


def encoder_batches(tokenizer_json: Path, texts: Sequence[str], session, *, max_length: int,
                    batch_size: int) -> Iterator[tuple[list[int], dict]]:
    """(indices into `texts`, feeds) per batch, texts of similar token counts together, as
    the runtime's embed() and classify() batch them (runtime.model.batches): less compute
    goes to padding. MiniLM's 100 calibration utterances in batches of 16 pad to 1,212
    positions in text order, 844 sorted (790 tokens): its int8 graph runs them in 149-166
    ms sorted against 227-245 ms on one core, and the sensitivity stage scores ~55 graphs
    on them."""
    names = [i.name for i in session.get_inputs()]
    yield from batches(Tokenizer.from_file(tokenizer_json), texts, max_length=max_length,
                       batch_size=batch_size, input_names=names)


def host_threads(target) -> int:
    """The intra-op threads of every session the export runs on this host (calibration,
    the sensitivity search's scoring, validation, timing): the profile's, but no more than
    this host's cores. rpi5's 4 threads on a 2-core build host contend for the cores
    (measured there: batch-1 p50 of the MiniLM bundle 7.2 ms on 4 threads, 2.6 ms on 2; the
    sensitivity search's scoring 1.5-2x slower), so its latency budget was judged on a
    slowdown the device does not have. 0 (all cores) stays 0; the bundle's manifest keeps
    the profile's number, for the device."""
    threads = target.runtime.threads
    return min(threads, usable_cores()) if threads else 0
