"""Text for calibration and evaluation: files the user gives, or real smart-home utterances.

The default text comes from the English sentence templates of the `home-assistant-intents`
package (42 intents, Apache-2.0). The templates expand combinatorially (optional words,
alternatives, slot lists), so instead of enumerating them we walk each template's expression
tree with a seeded RNG, filling open slots (area, device name, shopping item ...) from small
lists of plausible values. Which split an utterance belongs to is decided by a hash of its
text, so calibration and evaluation sets never share an utterance, whatever their sizes.

    >>> texts = smart_home_utterances(200, split="calibration")
    >>> len(texts), texts[0].intent
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Split name -> share of the hash space (percent). Disjoint by construction.
SPLITS: dict[str, range] = {
    "train": range(0, 60),
    "calibration": range(60, 75),
    "eval": range(75, 90),
    "test": range(90, 100),
}

# Values for the slots that Home Assistant fills from the user's own home at run time.
OPEN_SLOTS: dict[str, tuple[str, ...]] = {
    "area": ("kitchen", "living room", "bedroom", "bathroom", "garage", "office", "hallway",
             "dining room", "basement", "nursery", "patio", "guest room", "attic", "laundry room"),
    "floor": ("ground floor", "first floor", "second floor", "upstairs", "downstairs", "basement"),
    "name": ("ceiling light", "desk lamp", "coffee maker", "front door", "garage door",
             "porch light", "air purifier", "tv", "heater", "bedside lamp", "dishwasher",
             "kitchen fan", "reading light", "thermostat", "smart plug", "christmas lights",
             "robot vacuum", "back door lock", "sprinkler", "living room blinds"),
    "shopping_list_item": ("milk", "eggs", "bread", "apples", "coffee beans", "toilet paper",
                           "batteries", "olive oil", "dog food", "bananas"),
    "todo_list_item": ("call the plumber", "pay the electricity bill", "water the plants",
                       "book a dentist appointment", "clean the gutters", "renew the passport"),
    "search_query": ("jazz for a rainy day", "the beatles", "relaxing piano", "the news",
                     "taylor swift", "lofi beats", "a podcast about history"),
    "message": ("dinner is ready", "time to leave for school", "the laundry is done",
                "please come downstairs", "movie starts in five minutes"),
    "timer_name": ("pizza", "pasta", "laundry", "tea", "nap"),
    "timer_command": ("turn off the oven", "turn on the porch light"),
    "zone": ("home", "work", "school", "the gym"),
}


@dataclass(frozen=True)
class Utterance:
    """One text with its label (intent name for the default data, None when unknown)."""

    text: str
    intent: str | None = None
    where: str = ""   # "file:line" for texts read from a file, for error messages
    label_id: int | None = None   # a .jsonl label given as a class index (as HF datasets write)


# Half of a UTF-16 surrogate pair: no character, and nothing UTF-8 encodes or tokenizes.
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_characters(text: str, where: str) -> None:
    """ValueError naming `where` when `text` holds a lone surrogate: a JSON "\\ud800" escape
    (or a str built in code) reads as one, and it crashed the export mid-pipeline, where a
    .txt file's (not UTF-8) is refused when read."""
    match = _SURROGATE.search(text)
    if match:
        raise ValueError(f"{where} holds a lone surrogate U+{ord(match.group()):04X} "
                         f"(character {match.start() + 1}), half of a UTF-16 pair and no "
                         f"character: write the character itself, or both halves of its "
                         f"pair (\\ud83d\\ude00).")



def unlabelled_text(utterances: list[Utterance], what: str = "evaluation") -> str:
    """How many of `utterances` have no label, and where the first is, in words ("" when
    every one has one): what a labelled metric's absence is explained by."""
    missing = [u for u in utterances if u.intent is None]
    if not missing:
        return ""
    first = f" (the first: {missing[0].where})" if missing[0].where else ""
    return f"{len(missing)} of the {len(utterances)} {what} texts have no label{first}"


def split_of(text: str) -> str:
    """The split a text belongs to, decided by its hash (stable across runs and sizes)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 100
    return next(name for name, share in SPLITS.items() if bucket in share)


def smart_home_utterances(n: int, *, split: str, seed: int = 0) -> list[Utterance]:
    """`n` distinct English smart-home commands from one split, sampled with a seeded RNG.

    Intents are drawn uniformly, then one of the intent's templates, then one expansion of it,
    so rare intents are not drowned by the ones with many templates.

        >>> [u.text for u in smart_home_utterances(2, split="eval")]
        ['turn on the kitchen lights', ...]
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}. Available: {', '.join(SPLITS)}.")
    if n < 1:
        raise ValueError(f"Asked for {n} utterances; ask for at least 1.")
    sampler = _TemplateSampler(seed)
    seen: set[str] = set()
    out: list[Utterance] = []
    for _ in range(200 * n):
        utt = sampler.sample()
        if utt.text in seen or split_of(utt.text) != split:
            continue
        seen.add(utt.text)
        out.append(utt)
        if len(out) == n:
            return out
    raise ValueError(f"Could only sample {len(out)} distinct utterances of the {n} asked for.")


def read_texts(path: str | Path) -> list[Utterance]:
    """Texts from a `.txt` file (one per line) or a `.jsonl` file ("text", optional "label":
    a label name, or a class index as Hugging Face datasets write it).

    Blank lines are skipped. Raises FileNotFoundError for a missing file and ValueError for
    bad encoding, a bad JSON line (or a lone surrogate in its text), or a file with no text at
    all, naming the file and line.
    """
    if isinstance(path, str) and not path.strip():   # Path("") is ".", a directory
        raise ValueError(f"Text file {path!r} names no file; give a .txt or .jsonl path, or "
                         f"leave it out for the default texts.")
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"Text file {str(path)!r} {what}.")
    suffix = path.suffix.lower()   # DATA.TXT, as Windows tools name files
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"Text file {str(path)!r} must end in .txt (one text per line) "
                         f"or .jsonl (objects with a \"text\" field), not {path.suffix!r}.")
    try:
        # utf-8-sig: a BOM (Windows editors write one) is not text. Lines end at "\n" (and
        # "\r\n") only: splitlines() also breaks at U+2028, U+0085 or \x0c, which JSON
        # strings and prose may hold, and read_text() at a lone "\r" (universal newlines).
        lines = [line.removesuffix("\r")
                 for line in path.read_bytes().decode("utf-8-sig").split("\n")]
    except UnicodeDecodeError as e:
        raise ValueError(f"Text file {str(path)!r} is not valid UTF-8 (byte {e.start}): "
                         f"re-save it as UTF-8.") from e
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if suffix == ".txt":
            out.append(Utterance(line, where=f"{path}:{number}"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}).") from e
        except RecursionError:   # the parser recurses per [ or {
            raise ValueError(f"{path}:{number}: JSON nested too deeply to read; each line is "
                             f"one object with a \"text\" field.") from None
        except ValueError as e:   # an integer past Python's digits limit (4300)
            raise ValueError(f"{path}:{number}: a number too long to read "
                             f"({str(e).split(';')[0]}); a \"label\" is a name or a class "
                             f"index (0, 1, ...).") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string \"text\" field.")
        if not record["text"].strip():
            raise ValueError(f"{path}:{number}: \"text\" is empty; give the text or leave the "
                             f"line out.")
        check_characters(record["text"], f"{path}:{number}: \"text\"")
        label = record.get("label")
        index = label if isinstance(label, int) and not isinstance(label, bool) else None
        out.append(Utterance(record["text"], None if label is None else str(label),
                             where=f"{path}:{number}", label_id=index))
    if not out:
        raise ValueError(f"Text file {str(path)!r} holds no text: give at least one line.")
    if suffix == ".txt" and all(_json_record(u.text) for u in out):
        raise ValueError(f"Text file {str(path)!r} holds JSON Lines (each line an object with "
                         f"a \"text\" field), which a .txt file would take as the texts "
                         f"themselves, braces and labels included: rename it to .jsonl.")
    return out


def _json_record(line: str) -> bool:
    """Whether `line` is a JSON object with a string "text" field (a .jsonl line)."""
    if not line.lstrip().startswith("{"):
        return False
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(record, dict) and isinstance(record.get("text"), str)


class _TemplateSampler:
    """Random walk over hassil expression trees of the English intents."""

    def __init__(self, seed: int):
        import home_assistant_intents
        from hassil.intents import Intents

        self._rng = random.Random(seed)
        self._intents = Intents.from_dict(home_assistant_intents.get_intents("en"))
        self._names = sorted(self._intents.intents)

    def sample(self) -> Utterance:
        rng = self._rng
        name = rng.choice(self._names)
        data = rng.choice(self._intents.intents[name].data)
        sentence = rng.choice(data.sentences)
        rules = {**self._intents.expansion_rules, **data.expansion_rules}
        lists = {**self._intents.slot_lists, **data.slot_lists}
        text = self._expand(sentence.expression, rules, lists)
        return Utterance(re.sub(r"\s+", " ", text).strip(), name)

    def _expand(self, exp, rules, lists) -> str:
        from hassil import expression as ex
        from hassil.intents import RangeSlotList, TextSlotList

        rng = self._rng
        if isinstance(exp, ex.TextChunk):
            return exp.text
        if isinstance(exp, ex.Alternative):
            return self._expand(rng.choice(exp.items), rules, lists)
        if isinstance(exp, ex.Permutation):
            items = list(exp.items)
            rng.shuffle(items)
            return " ".join(self._expand(item, rules, lists) for item in items)
        if isinstance(exp, ex.Group):  # Sequence
            return "".join(self._expand(item, rules, lists) for item in exp.items)
        if isinstance(exp, ex.RuleReference):
            return self._expand(rules[exp.rule_name].expression, rules, lists)
        if isinstance(exp, ex.ListReference):
            slot = lists.get(exp.list_name)
            if isinstance(slot, TextSlotList) and slot.values:
                return self._expand(rng.choice(slot.values).text_in, rules, lists)
            if isinstance(slot, RangeSlotList):
                return str(rng.randrange(slot.start, slot.stop + 1, slot.step))
            values = OPEN_SLOTS.get(exp.list_name) or OPEN_SLOTS["name"]
            return rng.choice(values)
        raise AssertionError(f"unexpected hassil expression {type(exp).__name__}")


def iter_batches(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of `items` of at most `size` elements."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def english_prose() -> list[str]:
    """Paragraphs of real English prose that ship with Python itself: the Language Reference
    and Library topics of `pydoc_data` (what `help("assert")` shows), without code samples,
    grammar rules and heading underlines. About 300 KB, the same on every machine with the
    same Python; used to measure decoder perplexity when no --eval file is given."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.splitlines()
            if not lines or any(line.startswith((" ", "\t")) for line in lines):
                continue  # code, grammar and indented tables
            if len(lines) >= 2 and set(lines[-1]) <= set("*=-~^"):
                continue  # a heading
            text = " ".join(line.strip() for line in lines)
            if len(text) >= 80 and text.count(" ") >= 12:
                paragraphs.append(text)
    return paragraphs


def intent_strings(languages: list[str] | None = None) -> list[str]:
    """Every distinct string in home-assistant-intents (sentence templates, slot values,
    responses) for `languages` (default: all ~65), sorted: a large multilingual corpus of
    real text that ships offline, for tokenizer checks and benchmarks."""
    import home_assistant_intents

    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    chosen = languages or home_assistant_intents.get_languages()
    return sorted({text for language in chosen
                   for text in strings(home_assistant_intents.get_intents(language))})


def llama_layout_tokenizer(vocab_size: int = 8000) -> dict:
    """A tokenizer.json (as a dict) laid out as transformers converts Llama 2's (legacy=True),
    its vocab and merges trained here by Hugging Face's BPE trainer on `english_prose`: the
    normalizer Sequence[Prepend("▁"), Replace(" ", "▁")], no pre-tokenizer, BPE with
    byte_fallback and fuse_unk, <unk> <s> </s> and the 256 <0xNN> byte tokens in the model
    vocab, "<s> $A", the decoder Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip].
    No Llama-2-family tokenizer ships offline; the tests and benchmarks/bench_tokenizer.py
    check the runtime's SentencePiece-style BPE against HF on this one. Needs `tokenizers`
    (the test extra); a few seconds."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    space = "\u2581"
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=300,
                                  special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    hf.train_from_iterator(english_prose(), trainer)
    data = json.loads(hf.to_str())
    # Llama 2's byte tokens are in the model vocab only, not added tokens.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in byte_tokens]
    bos = [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    return data | {
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": space},
            {"type": "Replace", "pattern": {"String": " "}, "content": space}]},
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": space}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "post_processor": {
            "type": "TemplateProcessing", "single": bos,
            "pair": [*bos, {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    }


def xlmr_layout_tokenizer(folder: str | Path, vocab_size: int = 8000) -> Path:
    """Write a tokenizer.json laid out as transformers saves XLM-R's (multilingual-e5,
    paraphrase-multilingual-MiniLM) into `folder`, and return its path: a SentencePiece
    Unigram model trained here on `english_prose` and the ~65 languages of `intent_strings`
    (SentencePiece's nmt_nfkc normalization, as XLM-R's), converted by transformers'
    XLMRobertaTokenizerFast: the normalizer Sequence[Precompiled(charsmap), Strip(right),
    Replace(" {2,}", "▁")], a Metaspace pre-tokenizer and decoder, <s> <pad> </s> <unk>,
    <mask> (lstrip, normalized) and "<s> $A </s>". No Unigram tokenizer ships offline; the
    tests and benchmarks/bench_tokenizer.py check the runtime's Unigram against HF on this
    one. Needs `sentencepiece` (the test extra) and transformers; about ten seconds."""
    import sentencepiece
    from transformers import XLMRobertaTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(english_prose() + intent_strings()[::2]) + "\n",
                      encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "unigram"), vocab_size=vocab_size,
        model_type="unigram", character_coverage=0.9995, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    XLMRobertaTokenizerFast(vocab_file=str(folder / "unigram.model")).save_pretrained(folder)
    corpus.unlink()
    return folder / "tokenizer.json"
