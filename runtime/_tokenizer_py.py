"""Pure-Python tokenizer hot loops: text in, content ids out.

This is the readable reference for `runtime.tokenizer`. It ports, step by step,
what Hugging Face `tokenizers` (Rust, v0.22) does for three families of files:

    WordPiece (BERT):
    added tokens  ->  BertNormalizer  ->  BertPreTokenizer  ->  WordPiece  ->  ids
    (added_vocabulary.rs) (normalizers/bert.rs) (pre_tokenizers/bert.rs) (models/wordpiece)

    byte-level BPE (GPT-2, Llama-3, SmolLM2):
    added tokens  ->  [Digits]  ->  regex split  ->  UTF-8 bytes  ->  BPE merges  ->  ids
                 (pre_tokenizers/digits.rs, byte_level.rs, split.rs)  (models/bpe/word.rs)

    SentencePiece-style BPE (Llama 2, Mistral, TinyLlama, Phi-3):
    added tokens  ->  "▁" for spaces and in front  ->  chars, <0xNN> bytes  ->  BPE merges  ->  ids
         (normalizers/prepend.rs, replace.rs or pre_tokenizers/metaspace.rs)  (models/bpe/model.rs)

    Unigram (XLM-R, multilingual-e5, T5):
    added tokens  ->  Precompiled, Strip, Replace  ->  Metaspace  ->  Viterbi over pieces  ->  ids
                 (normalizers/precompiled.rs, spm_precompiled)      (models/unigram/model.rs)

A C twin (`runtime._tokenizer_c`) may replace it; it must offer the same
surface: `WordPieceEncoder(vocab, **options)`, `BPEEncoder(vocab, merges,
**options)`, `SentencePieceBPEEncoder(vocab, merges, **options)` and
`UnigramEncoder(pieces, **options)`, each with
`.encode(text, /, prefix=(), suffix=(), max_content=None)
-> list[int]`: the text's ids, cut to `max_content`, between `prefix` and `suffix`.
Only the twin has `encode_offsets` (the same ids, and the characters each came
from); `runtime.Tokenizer` uses it on either backend.
Which special tokens and what truncation budget are policy, decided in
`tokenizer.py` (the encoders only apply them), as is decoding.

Unicode tables. HF decides "control", "punctuation" and "non-spacing mark" with
the `unicode_categories` crate, frozen at Unicode 8.0, while Python's
`unicodedata` is newer (14.0 on 3.11) and changes with the interpreter. Using
`unicodedata.category` would split or drop characters HF keeps (e.g. U+2E43 is
punctuation since Unicode 9, U+08E2 a format char since 9, U+166D stopped being
punctuation in 12), so the three sets below are the exact HF sets as code-point
ranges; tests/test_tokenizer.py checks them against HF on every code point.
Whitespace follows Rust's `char::is_whitespace` (not `str.isspace`, which also
counts U+001C..U+001F). Lowercasing follows Rust's `char::to_lowercase`
(Unicode 16) one char at a time: Python's `str.lower` applies the final-sigma
rule (word-final 'Σ' -> 'ς', HF gives 'σ') and, before Python 3.14, misses the
Unicode 16 case pairs listed in `_LOWERCASE_ADDITIONS`.

Example:
    >>> enc = WordPieceEncoder({"[UNK]": 0, "hello": 1, "##s": 2, "!": 3},
    ...     unk_token="[UNK]", continuing_subword_prefix="##",
    ...     max_input_chars_per_word=100, clean_text=True,
    ...     handle_chinese_chars=True, strip_accents=True, lowercase=True)
    >>> enc.encode("Héllos!  wörld")
    [1, 2, 3, 0]
"""

from __future__ import annotations

import bisect
import functools
import heapq
import re
import struct
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple


def _char_class(ranges: str) -> str:
    """Turn 'hex' / 'hex-hex' items into the body of a regex character class."""
    parts = []
    for item in ranges.split():
        first, _, last = item.partition("-")
        lo, hi = chr(int(first, 16)), chr(int(last or first, 16))
        parts.append(re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}")
    return "".join(parts)


# Removed by `clean_text`: HF's is_control = Cc|Cf|Co|Cs (Unicode 8.0) minus
# \t\n\r, plus NUL and U+FFFD. Unassigned code points (Cn) are NOT removed:
# the crate's Cn test never fires, so HF keeps them (and so do we).
# D800-DFFF are lone surrogates, which Python strings can hold and Rust cannot.
_CONTROL = _char_class("""
    0-8 B-C E-1F 7F-9F AD 600-605 61C 6DD 70F 180E 200B-200F 202A-202E 2060-2064
    2066-206F D800-F8FF FEFF FFF9-FFFB FFFD 110BD 1BCA0-1BCA3 1D173-1D17A E0001
    E0020-E007F F0000-FFFFD 100000-10FFFD
""")

# Rust `char::is_whitespace` (the Unicode White_Space property).
_WHITESPACE = _char_class("9-D 20 85 A0 1680 2000-200A 2028-2029 202F 205F 3000")

# What `clean_text` maps to ' ': Rust whitespace that survived the control filter.
_CLEAN_WHITESPACE = _char_class("9-A D A0 1680 2000-200A 2028-2029 202F 205F 3000")

# BertPreTokenizer isolates these: ASCII punctuation (33-47, 58-64, 91-96,
# 123-126, which includes symbols like '$', '+', '^') plus Unicode P* (8.0).
_PUNCTUATION = _char_class("""
    21-2F 3A-40 5B-60 7B-7E A1 A7 AB B6-B7 BB BF 37E 387 55A-55F 589-58A 5BE 5C0 5C3 5C6
    5F3-5F4 609-60A 60C-60D 61B 61E-61F 66A-66D 6D4 700-70D 7F7-7F9 830-83E 85E 964-965
    970 AF0 DF4 E4F E5A-E5B F04-F12 F14 F3A-F3D F85 FD0-FD4 FD9-FDA 104A-104F 10FB
    1360-1368 1400 166D-166E 169B-169C 16EB-16ED 1735-1736 17D4-17D6 17D8-17DA 1800-180A
    1944-1945 1A1E-1A1F 1AA0-1AA6 1AA8-1AAD 1B5A-1B60 1BFC-1BFF 1C3B-1C3F 1C7E-1C7F
    1CC0-1CC7 1CD3 2010-2027 2030-2043 2045-2051 2053-205E 207D-207E 208D-208E 2308-230B
    2329-232A 2768-2775 27C5-27C6 27E6-27EF 2983-2998 29D8-29DB 29FC-29FD 2CF9-2CFC
    2CFE-2CFF 2D70 2E00-2E2E 2E30-2E42 3001-3003 3008-3011 3014-301F 3030 303D 30A0 30FB
    A4FE-A4FF A60D-A60F A673 A67E A6F2-A6F7 A874-A877 A8CE-A8CF A8F8-A8FA A8FC A92E-A92F
    A95F A9C1-A9CD A9DE-A9DF AA5C-AA5F AADE-AADF AAF0-AAF1 ABEB FD3E-FD3F FE10-FE19
    FE30-FE52 FE54-FE61 FE63 FE68 FE6A-FE6B FF01-FF03 FF05-FF0A FF0C-FF0F FF1A-FF1B
    FF1F-FF20 FF3B-FF3D FF3F FF5B FF5D FF5F-FF65 10100-10102 1039F 103D0 1056F 10857
    1091F 1093F 10A50-10A58 10A7F 10AF0-10AF6 10B39-10B3F 10B99-10B9C 11047-1104D
    110BB-110BC 110BE-110C1 11140-11143 11174-11175 111C5-111C9 111CD 111DB 111DD-111DF
    11238-1123D 112A9 114C6 115C1-115D7 11641-11643 1173C-1173E 12470-12474 16A6E-16A6F
    16AF5 16B37-16B3B 16B44 1BC9F 1DA87-1DA8B
""")

# Dropped by `strip_accents` after NFD: category Mn in Unicode 8.0.
_NONSPACING_MARK = _char_class("""
    300-36F 483-487 591-5BD 5BF 5C1-5C2 5C4-5C5 5C7 610-61A 64B-65F 670 6D6-6DC 6DF-6E4
    6E7-6E8 6EA-6ED 711 730-74A 7A6-7B0 7EB-7F3 816-819 81B-823 825-827 829-82D 859-85B
    8E3-902 93A 93C 941-948 94D 951-957 962-963 981 9BC 9C1-9C4 9CD 9E2-9E3 A01-A02 A3C
    A41-A42 A47-A48 A4B-A4D A51 A70-A71 A75 A81-A82 ABC AC1-AC5 AC7-AC8 ACD AE2-AE3 B01
    B3C B3F B41-B44 B4D B56 B62-B63 B82 BC0 BCD C00 C3E-C40 C46-C48 C4A-C4D C55-C56
    C62-C63 C81 CBC CBF CC6 CCC-CCD CE2-CE3 D01 D41-D44 D4D D62-D63 DCA DD2-DD4 DD6 E31
    E34-E3A E47-E4E EB1 EB4-EB9 EBB-EBC EC8-ECD F18-F19 F35 F37 F39 F71-F7E F80-F84
    F86-F87 F8D-F97 F99-FBC FC6 102D-1030 1032-1037 1039-103A 103D-103E 1058-1059
    105E-1060 1071-1074 1082 1085-1086 108D 109D 135D-135F 1712-1714 1732-1734 1752-1753
    1772-1773 17B4-17B5 17B7-17BD 17C6 17C9-17D3 17DD 180B-180D 18A9 1920-1922 1927-1928
    1932 1939-193B 1A17-1A18 1A1B 1A56 1A58-1A5E 1A60 1A62 1A65-1A6C 1A73-1A7C 1A7F
    1AB0-1ABD 1B00-1B03 1B34 1B36-1B3A 1B3C 1B42 1B6B-1B73 1B80-1B81 1BA2-1BA5 1BA8-1BA9
    1BAB-1BAD 1BE6 1BE8-1BE9 1BED 1BEF-1BF1 1C2C-1C33 1C36-1C37 1CD0-1CD2 1CD4-1CE0
    1CE2-1CE8 1CED 1CF4 1CF8-1CF9 1DC0-1DF5 1DFC-1DFF 20D0-20DC 20E1 20E5-20F0 2CEF-2CF1
    2D7F 2DE0-2DFF 302A-302D 3099-309A A66F A674-A67D A69E-A69F A6F0-A6F1 A802 A806 A80B
    A825-A826 A8C4 A8E0-A8F1 A926-A92D A947-A951 A980-A982 A9B3 A9B6-A9B9 A9BC A9E5
    AA29-AA2E AA31-AA32 AA35-AA36 AA43 AA4C AA7C AAB0 AAB2-AAB4 AAB7-AAB8 AABE-AABF AAC1
    AAEC-AAED AAF6 ABE5 ABE8 ABED FB1E FE00-FE0F FE20-FE2F 101FD 102E0 10376-1037A
    10A01-10A03 10A05-10A06 10A0C-10A0F 10A38-10A3A 10A3F 10AE5-10AE6 11001 11038-11046
    1107F-11081 110B3-110B6 110B9-110BA 11100-11102 11127-1112B 1112D-11134 11173
    11180-11181 111B6-111BE 111CA-111CC 1122F-11231 11234 11236-11237 112DF 112E3-112EA
    11300-11301 1133C 11340 11366-1136C 11370-11374 114B3-114B8 114BA 114BF-114C0
    114C2-114C3 115B2-115B5 115BC-115BD 115BF-115C0 115DC-115DD 11633-1163A 1163D
    1163F-11640 116AB 116AD 116B0-116B5 116B7 1171D-1171F 11722-11725 11727-1172B
    16AF0-16AF4 16B30-16B36 16F8F-16F92 1BC9D-1BC9E 1D167-1D169 1D17B-1D182 1D185-1D18B
    1D1AA-1D1AD 1D242-1D244 1DA00-1DA36 1DA3B-1DA6C 1DA75 1DA84 1DA9B-1DA9F 1DAA1-1DAAF
    1E8D0-1E8D6 E0100-E01EF
""")

# `handle_chinese_chars` puts spaces around these. Copied from bert.rs, including
# its gap at 2B820-2B91F (part of CJK Extension E, not treated as Chinese by HF).
_CJK = _char_class("3400-4DBF 4E00-9FFF F900-FAFF 20000-2A6DF 2A700-2B81F 2B920-2CEAF 2F800-2FA1F")

# Case pairs new in Unicode 16 that Rust lowercases and Python < 3.14 does not.
# Columns: first code point, last code point, lowercase of the first (the rest
# of a run maps with the same offset).
_LOWERCASE_ADDITIONS = (
    (0x01C89, 0x01C89, 0x01C8A),  # CYRILLIC CAPITAL LETTER TJE
    (0x0A7CB, 0x0A7CB, 0x00264),  # LATIN CAPITAL LETTER RAMS HORN
    (0x0A7CC, 0x0A7CC, 0x0A7CD),  # LATIN CAPITAL LETTER S WITH DIAGONAL STROKE
    (0x0A7CE, 0x0A7CE, 0x0A7CF),
    (0x0A7D2, 0x0A7D2, 0x0A7D3),
    (0x0A7D4, 0x0A7D4, 0x0A7D5),
    (0x0A7DA, 0x0A7DA, 0x0A7DB),  # LATIN CAPITAL LETTER LAMBDA
    (0x0A7DC, 0x0A7DC, 0x0019B),  # LATIN CAPITAL LETTER LAMBDA WITH STROKE
    (0x10D50, 0x10D65, 0x10D70),  # GARAY CAPITAL LETTERS
    (0x16EA0, 0x16EB8, 0x16EBB),  # BERIA ERFE CAPITAL LETTERS
)
# str.translate table applied before str.lower(): the additions above, and 'Σ'
# pre-lowered so str.lower() never sees it and cannot apply the final-sigma rule.
_LOWERCASE_FIXES = {0x03A3: 0x03C3} | {
    cp: lower + cp - first
    for first, last, lower in _LOWERCASE_ADDITIONS
    for cp in range(first, last + 1)
}

# The "other alphabetic" symbols (circled/squared Latin letters) that Rust
# regex's `\w` counts as word characters while their category is So.
_OTHER_ALPHABETIC_SYMBOLS = _char_class("24B6-24E9 1F130-1F149 1F150-1F169 1F170-1F189")
# Rust regex's `\w` is Unicode 16 in tokenizers 0.22; these word characters were
# assigned in Unicode 15 and 16 (letters, marks, digits), unknown to Python 3.11's
# unicodedata (14.0). Checked against HF on every code point by
# tests/test_tokenizer.py::test_single_word_boundary_matches_hf_on_every_code_point.
_WORD_ADDITIONS = _char_class("""
    897 CF3 ECE 1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D40-10D65 10D69-10D6D 10D6F-10D85
    10EC2-10EC4 10EFC-10EFF 1123F-11241 11380-11389 1138B 1138E 11390-113B5 113B7-113C0 113C2
    113C5 113C7-113CA 113CC-113D3 113E1-113E2 116D0-116E3 11BC0-11BE0 11BF0-11BF9 11F00-11F10
    11F12-11F3A 11F3E-11F42 11F50-11F5A 1342F 13440-13455 13460-143FA 16100-16139 16D40-16D6C
    16D70-16D79 18CFF 1B132 1B155 1CCF0-1CCF9 1DF25-1DF2A 1E030-1E06D 1E08F 1E4D0-1E4F9
    1E5D0-1E5FA 2B739 2EBF0-2EE5D 31350-323AF
""")

_CONTROL_RE = re.compile(f"[{_CONTROL}]+")
_CLEAN_WHITESPACE_RE = re.compile(f"[{_CLEAN_WHITESPACE}]")
_WHITESPACE_RE = re.compile(f"[{_WHITESPACE}]+")
_ONE_WHITESPACE_RE = re.compile(f"[{_WHITESPACE}]")   # one char: a run's match rescans it
_NON_WHITESPACE_RE = re.compile(f"[^{_WHITESPACE}]+")
_PUNCTUATION_SPLIT_RE = re.compile(f"([{_PUNCTUATION}])")
_NONSPACING_MARK_RE = re.compile(f"[{_NONSPACING_MARK}]+")
_CJK_RE = re.compile(f"[{_CJK}]")
_OTHER_ALPHABETIC_RE = re.compile(f"[{_OTHER_ALPHABETIC_SYMBOLS}{_WORD_ADDITIONS}]")

# Per-word cache bounds: at most this many words of at most this many chars
# (~2 MB), cleared when full. Clearing is O(1) and safe under threads; natural
# text repeats few enough distinct words that LRU bookkeeping does not pay off.
_CACHE_WORDS = 1 << 14
_CACHE_MAX_WORD_CHARS = 64


def _remember(cache: dict, word: str | bytes, value: Any) -> None:
    """Keep `value` for `word` in a per-word cache, within the bounds above."""
    if len(word) <= _CACHE_MAX_WORD_CHARS:
        if len(cache) >= _CACHE_WORDS:
            cache.clear()
        cache[word] = value


class AddedToken(NamedTuple):
    """One entry of tokenizer.json's `added_tokens`, matched before the model."""

    content: str
    id: int
    special: bool = False
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False


class _Encoder:
    """What both encoders share: `encode` puts runtime.Tokenizer's special tokens and
    truncation budget around the ids of `content_ids`, which each encoder defines."""

    def content_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(
        self,
        text: str,
        /,
        prefix: Iterable[int] = (),
        suffix: Iterable[int] = (),
        max_content: int | None = None,
    ) -> list[int]:
        """`[*prefix, *content_ids(text)[:max_content], *suffix]`."""
        ids = self.content_ids(_chars(text))
        if max_content is not None:
            del ids[max_content:]
        ids[:0] = prefix
        ids += suffix
        return ids

    def content_spans(self, text: str) -> list[tuple[int, int, int]]:
        raise NotImplementedError

    def encode_offsets(
        self,
        text: str,
        /,
        prefix: Iterable[int] = (),
        suffix: Iterable[int] = (),
        max_content: int | None = None,
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode`'s ids, and for each the (start, end) of the characters of `text`
        it came from, as HF's `Encoding.offsets` before any post-processor trimming;
        (0, 0) for `prefix` and `suffix`."""
        spans = self.content_spans(_chars(text))[:max_content]
        prefix, suffix = list(prefix), list(suffix)
        ids = [*prefix, *(token_id for token_id, _, _ in spans), *suffix]
        offsets = [(0, 0)] * len(prefix) + [(s, e) for _, s, e in spans] + [(0, 0)] * len(suffix)
        return ids, offsets


def _chars(text: str) -> str:
    """`text` as a plain str: a str subclass's own methods (`__len__`, `lower`, `__iter__`,
    ...) could tell the twin other characters than those HF and the C backend read."""
    return text if type(text) is str else str.__str__(text)


def _is_word_char(char: str) -> bool:
    # Rust regex `\w`: Alphabetic | Mark | Decimal_Number | Connector_Punctuation
    # | Join_Control. Used only by `single_word` added tokens. Python's categories,
    # plus the word characters of Unicode 15 and 16 (_WORD_ADDITIONS), as HF's.
    category = unicodedata.category(char)
    return (
        category[0] in "LM"
        or category in ("Nd", "Nl", "Pc")
        or char in "\u200c\u200d"
        or _OTHER_ALPHABETIC_RE.match(char) is not None
    )


def bert_normalize(text: str, *, clean_text: bool, handle_chinese_chars: bool,
                   strip_accents: bool, lowercase: bool) -> str:
    """BertNormalizer, in HF's order: clean, CJK spacing, accents, lowercase."""
    ascii_only = text.isascii()
    if clean_text:
        text = _CLEAN_WHITESPACE_RE.sub(" ", _CONTROL_RE.sub("", text))
    if handle_chinese_chars and not ascii_only:
        text = _CJK_RE.sub(r" \g<0> ", text)
    if strip_accents and not ascii_only:
        # Python's NFD knows a few characters newer than HF's crate (e.g.
        # U+11938 decomposes in Python, not in HF). Such characters are
        # never in a BERT vocab, so the word is [UNK] either way.
        text = _NONSPACING_MARK_RE.sub("", unicodedata.normalize("NFD", text))
    if lowercase:
        text = text.lower() if ascii_only else text.translate(_LOWERCASE_FIXES).lower()
    return text


class _AddedTokenSplitter:
    """Cuts text around added tokens, like AddedVocabulary::find_matches.

    Matching is leftmost-longest (HF uses Aho-Corasick in that mode): a regex
    alternation sorted longest-first picks the longest token at the leftmost
    position, and `finditer` resumes after each match, as `find_iter` does.
    """

    def __init__(self, tokens: Iterable[AddedToken]) -> None:
        # Tokens of one content (normalized ones: "Zorg" and "ZORG" under lowercase):
        # HF's matcher lists the special tokens first, then the others, each in
        # order, and the first listed wins.
        self._by_content: dict[str, AddedToken] = {}
        for token in sorted(tokens, key=lambda token: not token.special):
            if token.content:
                self._by_content.setdefault(token.content, token)
        patterns = sorted(self._by_content, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, patterns))) if patterns else None

    def split(self, text: str) -> Iterator[tuple[str, int | None]]:
        """Yield (piece, added token id) for tokens and (piece, None) between them."""
        if self._pattern is None:
            yield text, None
            return
        for start, stop, token_id in self.spans(text):
            yield text[start:stop], token_id

    def spans(self, text: str) -> Iterator[tuple[int, int, int | None]]:
        """`split`'s pieces as (start, stop, added token id or None) in `text`."""
        if self._pattern is None:
            if text:
                yield 0, len(text), None
            return
        offset = 0
        for match in self._pattern.finditer(text):
            start, stop = match.span()
            token = self._by_content[match.group()]
            if token.single_word and (
                (start > 0 and _is_word_char(text[start - 1]))
                or (stop < len(text) and _is_word_char(text[stop]))
            ):
                continue
            if token.lstrip:
                # Swallow the whitespace run on the left, but never text that
                # a previous (rstrip) token already took: HF's
                # max(newstart, start_offset), which moves the start forward
                # past what that rstrip took when the token begins inside it.
                while start > offset and _ONE_WHITESPACE_RE.match(text, start - 1):
                    start -= 1
                start = max(start, offset)
            if token.rstrip:
                while stop < len(text) and _ONE_WHITESPACE_RE.match(text, stop):
                    stop += 1
            if offset < start:
                yield offset, start, None
            yield start, stop, token.id
            offset = stop
        if offset < len(text):
            yield offset, len(text), None


class WordPieceEncoder(_Encoder):
    """Text to content ids (no special tokens) with BERT normalization and WordPiece.

    Args are the parsed fields of a tokenizer.json; `strip_accents` is already
    resolved (HF's null means "same as lowercase"). `added_tokens` are matched
    in the raw text (normalized=False) or in the normalized text (normalized=True).

    Example:
        >>> WordPieceEncoder({"[UNK]": 0, "un": 1, "##able": 2}, unk_token="[UNK]",
        ...     continuing_subword_prefix="##", max_input_chars_per_word=100,
        ...     clean_text=True, handle_chinese_chars=True, strip_accents=True,
        ...     lowercase=True).encode("UNABLE unknown")
        [1, 2, 0]
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        *,
        unk_token: str,
        continuing_subword_prefix: str,
        max_input_chars_per_word: int,
        clean_text: bool,
        handle_chinese_chars: bool,
        strip_accents: bool,
        lowercase: bool,
        added_tokens: Iterable[AddedToken] = (),
    ) -> None:
        self._vocab = dict(vocab)
        self._unk_id = self._vocab[unk_token]
        self._prefix = continuing_subword_prefix
        self._max_word_chars = max_input_chars_per_word
        # No vocab entry is longer than this, so longer candidates need no lookup.
        self._longest_token = max(map(len, self._vocab), default=0)
        self._clean_text = clean_text
        self._handle_chinese_chars = handle_chinese_chars
        self._strip_accents = strip_accents
        self._lowercase = lowercase
        self._cache: dict[str, tuple[int, ...]] = {}
        # For offsets only: each char's normalized form, and each id's token length.
        self._normalized_chars: dict[str, str] = {}
        self._token_lengths: dict[int, int] | None = None

        added_tokens = list(added_tokens)
        self._raw_added = _AddedTokenSplitter(t for t in added_tokens if not t.normalized)
        # HF matches normalized tokens by their own normalized form.
        self._normalized_added = _AddedTokenSplitter(
            t._replace(content=self.normalize(t.content)) for t in added_tokens if t.normalized
        )

    def content_ids(self, text: str) -> list[int]:
        """Ids of `text`, no special tokens: added tokens, then normalize/pre-tokenize/
        WordPiece."""
        ids: list[int] = []
        for piece, added_id in self._raw_added.split(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            for part, added_id in self._normalized_added.split(self.normalize(piece)):
                if added_id is not None:
                    ids.append(added_id)
                    continue
                for word in self._split_whitespace(part):
                    ids.extend(self._word_ids(word))
        return ids

    def content_spans(self, text: str) -> list[tuple[int, int, int]]:
        """`content_ids` as (id, start, end): the characters of `text` each id came from.

        Normalization maps each character of `text` to zero or more characters
        (CJK spacing adds two, accent stripping drops marks, 'İ' lowercases to
        two), so a normalized character's origin is the one it came from, as
        HF's alignments record it. WordPiece pieces tile their word (or one
        unk covers it), so each piece's span follows from its token's length.
        """
        spans: list[tuple[int, int, int]] = []
        for start, stop, added_id in self._raw_added.spans(text):
            if added_id is not None:
                spans.append((added_id, start, stop))
                continue
            normalized, origin = self._normalize_aligned(text, start, stop)
            for part_start, part_stop, added_id in self._normalized_added.spans(normalized):
                if added_id is not None:
                    spans.append((added_id, origin[part_start], origin[part_stop - 1] + 1))
                    continue
                for word in _NON_WHITESPACE_RE.finditer(normalized, part_start, part_stop):
                    at = word.start()
                    for piece in _PUNCTUATION_SPLIT_RE.split(word.group()):
                        for token_id, piece_start, piece_stop in self._piece_spans(piece, at):
                            spans.append(
                                (token_id, origin[piece_start], origin[piece_stop - 1] + 1)
                            )
                        at += len(piece)
        return spans

    def _normalize_aligned(self, text: str, start: int, stop: int) -> tuple[str, Sequence[int]]:
        """`normalize(text[start:stop])`, and for each of its characters the index in
        `text` of the character it came from."""
        piece = text[start:stop]
        if piece.isascii():
            normalized = self.normalize(piece)
            if len(normalized) == len(piece):  # one char for one char: nothing was dropped
                return normalized, range(start, stop)
        chars: list[str] = []
        origin: list[int] = []
        cache = self._normalized_chars
        for index, char in enumerate(piece, start):
            if (one := cache.get(char)) is None:
                one = cache[char] = self.normalize(char)
            chars.append(one)
            origin += [index] * len(one)
        return "".join(chars), origin

    def _piece_spans(self, piece: str, at: int) -> list[tuple[int, int, int]]:
        """WordPiece of `piece`, which starts at `at`, as (id, start, stop)."""
        ids = self.word_piece(piece)
        if ids == [self._unk_id]:  # a miss, or a piece that is the unk token itself
            return [(self._unk_id, at, at + len(piece))]
        if self._token_lengths is None:
            self._token_lengths = {i: len(token) for token, i in self._vocab.items()}
        spans = []
        for i, token_id in enumerate(ids):
            length = self._token_lengths[token_id] - (len(self._prefix) if i else 0)
            spans.append((token_id, at, at + length))
            at += length
        return spans

    def normalize(self, text: str) -> str:
        """BertNormalizer, in HF's order: clean, CJK spacing, accents, lowercase."""
        return bert_normalize(text, clean_text=self._clean_text,
                              handle_chinese_chars=self._handle_chinese_chars,
                              strip_accents=self._strip_accents, lowercase=self._lowercase)

    def pre_tokenize(self, text: str) -> list[str]:
        """BertPreTokenizer: drop whitespace, isolate each punctuation char."""
        return [
            piece
            for word in self._split_whitespace(text)
            for piece in _PUNCTUATION_SPLIT_RE.split(word)
            if piece
        ]

    def word_piece(self, word: str) -> list[int]:
        """Greedy longest-match-first WordPiece; any miss makes the whole word unk."""
        if len(word) > self._max_word_chars:
            return [self._unk_id]
        vocab, ids, start = self._vocab, [], 0
        while start < len(word):
            prefix = self._prefix if start else ""
            for end in range(min(len(word), start + self._longest_token), start, -1):
                token_id = vocab.get(prefix + word[start:end])
                if token_id is not None:
                    break
            else:
                return [self._unk_id]
            ids.append(token_id)
            start = end
        return ids

    def _split_whitespace(self, text: str) -> list[str]:
        # After clean_text, str.split() splits exactly on Rust whitespace: the
        # only chars it adds (U+001C..U+001F) are controls and already gone.
        return text.split() if self._clean_text else [w for w in _WHITESPACE_RE.split(text) if w]

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(
                token_id
                for piece in _PUNCTUATION_SPLIT_RE.split(word)
                if piece
                for token_id in self.word_piece(piece)
            )
            _remember(self._cache, word, ids)
        return ids


# ------------------------------------------------------------ byte-level BPE

# HF's byte-level regexes run on Oniguruma, whose \p{L} and \p{N} are Unicode 16
# in tokenizers 0.22; Python's unicodedata is older (14.0 on 3.11). The classes
# are Python's L* / N* categories plus the code points these lists add (those
# assigned in Unicode 15 and 16); tests/test_tokenizer.py checks them against HF
# on every code point. (A Python with Unicode 17 would know letters HF does not.)
_LETTER_ADDITIONS = """
    1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D4A-10D65 10D6F-10D85 10EC2-10EC4 1123F-11240
    11380-11389 1138B 1138E 11390-113B5 113B7 113D1 113D3 11BC0-11BE0 11F02 11F04-11F10
    11F12-11F33 1342F 13441-13446 13460-143FA 16100-1611D 16D40-16D6C 18CFF 1B132 1B155
    1DF25-1DF2A 1E030-1E06D 1E4D0-1E4EB 1E5D0-1E5ED 1E5F0 2B739 2EBF0-2EE5D 31350-323AF
"""
_NUMBER_ADDITIONS = """
    10D40-10D49 116D0-116E3 11BF0-11BF9 11F50-11F59 16130-16139 16D70-16D79 1CCF0-1CCF9
    1D2C0-1D2D3 1E4F0-1E4F9 1E5F1-1E5FA
"""
# The Digits pre-tokenizer uses Rust's char::is_numeric (Unicode 17): \p{N} and these.
_NUMERIC_ADDITIONS = "11DE0-11DE9 16FF4-16FF6"

# Regex `\s` in Oniguruma is White_Space, the same set as Rust's is_whitespace.
_SPACE = _WHITESPACE

# The two split regexes we implement, exactly as tokenizer.json spells them.
# GPT-2's is what ByteLevel(use_regex=True) applies (pre_tokenizers/byte_level.rs).
GPT2_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
# Llama-3's, used as a Split pre-tokenizer before ByteLevel(use_regex=False).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PATTERNS = {"gpt2": GPT2_PATTERN, "llama3": LLAMA3_PATTERN}


def _category_class(first_letter: str, additions: str) -> str:
    """Character-class body: Python's categories starting with `first_letter`, plus `additions`."""
    category, ranges, start = unicodedata.category, [], None
    for cp in range(0x110001):
        inside = cp < 0x110000 and category(chr(cp))[0] == first_letter
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"{start:X}-{cp - 1:X}")
            start = None
    return _char_class(" ".join(ranges) + additions)


@functools.cache
def byte_level_classes() -> dict[str, str]:
    """Regex class bodies of HF's \\p{L}, \\p{N} and is_numeric (built once, ~0.3 s)."""
    letter = _category_class("L", _LETTER_ADDITIONS)
    number = _category_class("N", _NUMBER_ADDITIONS)
    return {"letter": letter, "number": number, "numeric": number + _char_class(_NUMERIC_ADDITIONS)}


@functools.cache
def _split_regex(split: str) -> re.Pattern:
    """SPLIT_PATTERNS[split] in Python's `re` (a backtracking engine like Oniguruma,
    so alternation order and the (?!\\S) lookahead behave the same)."""
    classes = byte_level_classes()
    pattern = SPLIT_PATTERNS[split]
    for name, body in [
        (r"[^\s\p{L}\p{N}]", f"[^{_SPACE}{classes['letter']}{classes['number']}]"),
        (r"[^\r\n\p{L}\p{N}]", f"[^\\r\\n{classes['letter']}{classes['number']}]"),
        (r"\p{L}", f"[{classes['letter']}]"),
        (r"\p{N}", f"[{classes['number']}]"),
        (r"(?!\S)", f"(?![^{_SPACE}])"),
        (r"\s", f"[{_SPACE}]"),
    ]:
        pattern = pattern.replace(name, body)
    return re.compile(pattern)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable char map: printable Latin-1 bytes map to
    themselves, the other 68 to U+0100 onwards, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(0x100, 0x200))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


BYTE_TO_CHAR = _bytes_to_unicode()
# UTF-8 length of each byte's byte-level char: HF's BPE counts a word's offsets in these.
_BYTE_LEVEL_LENGTHS = [len(char.encode("utf-8")) for char in BYTE_TO_CHAR]
# str.translate table: Latin-1 char of a byte -> its byte-level char.
_LATIN1_TO_BYTE_LEVEL = dict(enumerate(BYTE_TO_CHAR))
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _shift_past_dropped(
    word: bytes, spans: list[list[int]], byte_ids: list[int | None]
) -> list[tuple[int, int, int]]:
    """`spans` (id, first byte, end byte) as HF's offsets have them when bytes without a
    token were dropped (no unk_token): HF's BPE::merge_word places each symbol right
    after the symbols kept before it, counting in the byte-level chars' UTF-8, so a
    token after a dropped byte is placed that byte's length early; read back through
    the word's real layout, its span may take in the character before its own."""
    real_starts = [0]  # where each byte's char starts in the byte-level word's UTF-8
    for byte in word:
        real_starts.append(real_starts[-1] + _BYTE_LEVEL_LENGTHS[byte])
    shifted, at = [], 0
    for symbol, start, end in spans:
        size = sum(_BYTE_LEVEL_LENGTHS[byte] for byte in word[start:end]
                   if byte_ids[byte] is not None)
        first = bisect.bisect_right(real_starts, at) - 1
        shifted.append((symbol, first, bisect.bisect_right(real_starts, at + size - 1)))
        at += size
    return shifted


def _merge_table(vocab: Mapping[str, int], merges: Iterable[tuple[str, str]]
                 ) -> dict[tuple[int, int], tuple[int, int]]:
    """(left id, right id) -> (rank, merged id); a pair listed twice keeps its last rank,
    as in HF (models/bpe/model.rs collects the merges into a HashMap)."""
    table: dict[tuple[int, int], tuple[int, int]] = {}
    for rank, (left, right) in enumerate(merges):
        try:
            pair = vocab[left], vocab[right]
            table[pair] = (rank, vocab[left + right])
        except KeyError as e:
            raise ValueError(
                f"merge {rank} ({left!r}, {right!r}) uses {e.args[0]!r}, which is not in "
                "the vocab."
            ) from e
    return table


def _merge_all(symbols: list[int | None],
               merges: Mapping[tuple[int, int], tuple[int, int]]) -> None:
    """Apply the merges to `symbols` in place: a merged pair's left symbol becomes
    the merged id, its right one None.

    A heap of (rank, position, merged id) with lazy deletion, as in
    tokenizers/src/models/bpe/word.rs, including its staleness test (the
    pair now at `position` must still merge into `merged id`).
    """
    n = len(symbols)
    after = [*range(1, n), -1]  # linked list over the live symbols
    before = list(range(-1, n - 1))
    heap = [
        (rank, i, new)
        for i in range(n - 1)
        for rank, new in [merges.get((symbols[i], symbols[i + 1]), (None, None))]
        if rank is not None
    ]
    heapq.heapify(heap)
    while heap:
        _, i, new = heapq.heappop(heap)
        j = after[i]
        if symbols[i] is None or j < 0:
            continue
        if merges.get((symbols[i], symbols[j]), (0, None))[1] != new:
            continue  # stale: the pair at i changed since this entry was pushed
        symbols[i], symbols[j] = new, None
        k = after[i] = after[j]
        if k >= 0:
            before[k] = i
        h = before[i]
        if h >= 0 and (merge := merges.get((symbols[h], new))):
            heapq.heappush(heap, (merge[0], h, merge[1]))
        if k >= 0 and (merge := merges.get((new, symbols[k]))):
            heapq.heappush(heap, (merge[0], i, merge[1]))


class BPEEncoder(_Encoder):
    """Text to content ids with a byte-level pre-tokenizer and BPE merges.

    `merges` are (left, right) token pairs, highest priority first. `split` names
    the regex ("gpt2" or "llama3", see SPLIT_PATTERNS); `individual_digits`
    puts a Digits(individual_digits=True) step before it; `add_prefix_space` and
    `ignore_merges`, `unk_id` and `fuse_unk` are the ByteLevel and BPE options
    of those names (`unk_id` the id of BPE's unk_token, or None). A lone
    surrogate (not valid UTF-8, so HF cannot take it) is read as U+FFFD.

    Example:
        >>> vocab = {c: i for i, c in enumerate(BYTE_TO_CHAR)} | {"Ġh": 256, "Ġhi": 257}
        >>> BPEEncoder(vocab, [("Ġ", "h"), ("Ġh", "i")], split="gpt2",
        ...     individual_digits=False, add_prefix_space=False,
        ...     ignore_merges=False).encode("hi hi")
        [104, 105, 257]
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[tuple[str, str]],
        *,
        split: str,
        individual_digits: bool,
        add_prefix_space: bool,
        ignore_merges: bool,
        unk_id: int | None = None,
        fuse_unk: bool = False,
        added_tokens: Iterable[AddedToken] = (),
    ) -> None:
        if split not in SPLIT_PATTERNS:
            raise ValueError(f"Unknown split {split!r}. Available: {', '.join(SPLIT_PATTERNS)}.")
        self._vocab = dict(vocab)
        # Id of each byte's token; None where the vocab lacks it (SmolLM2 has no
        # tokens for most control bytes): such bytes become unk_id, or vanish
        # without one, as in HF's BPE::merge_word.
        self._byte_ids = [self._vocab.get(c) for c in BYTE_TO_CHAR]
        self._unk_id = unk_id
        self._fuse_unk = fuse_unk
        self._merges = _merge_table(self._vocab, merges)
        self._split = split
        self._pattern = _split_regex(split)
        self._numeric = (
            re.compile(f"([{byte_level_classes()['numeric']}])") if individual_digits else None
        )
        self._add_prefix_space = add_prefix_space
        self._ignore_merges = ignore_merges
        self._cache: dict[str, tuple[int, ...]] = {}
        self._span_cache: dict[bytes, list[tuple[int, int, int]]] = {}  # for offsets only
        added_tokens = list(added_tokens)
        # No normalizer: a "normalized" token is matched in the raw text, but in
        # a second pass, after the others (as HF does).
        self._raw_added = _AddedTokenSplitter(t for t in added_tokens if not t.normalized)
        self._normalized_added = _AddedTokenSplitter(t for t in added_tokens if t.normalized)

    def content_ids(self, text: str) -> list[int]:
        """Ids of `text`, no special tokens: added tokens, then pre-tokenize and BPE
        each word."""
        if not text.isascii():
            text = _SURROGATE_RE.sub("\ufffd", text)
        ids: list[int] = []
        for piece, added_id in self._raw_added.split(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            for part, added_id in self._normalized_added.split(piece):
                if added_id is not None:
                    ids.append(added_id)
                    continue
                for word in self.pre_tokenize(part):
                    ids.extend(self._word_ids(word))
        return ids

    def content_spans(self, text: str) -> list[tuple[int, int, int]]:
        """`content_ids` as (id, start, end): the characters of `text` each id came from.

        A token covers whole characters: a byte of a character split between
        tokens (an emoji's four) counts that character in each of them, and the
        space `add_prefix_space` adds counts as the word's first character, as
        HF's alignments have it.
        """
        if not text.isascii():
            text = _SURROGATE_RE.sub("\ufffd", text)
        spans: list[tuple[int, int, int]] = []
        for start, stop, added_id in self._raw_added.spans(text):
            if added_id is not None:
                spans.append((added_id, start, stop))
                continue
            for part_start, part_stop, added_id in self._normalized_added.spans(text[start:stop]):
                part_start += start
                part_stop += start
                if added_id is not None:
                    spans.append((added_id, part_start, part_stop))
                    continue
                words = self._word_spans(text, part_start, part_stop)
                for word_start, word_stop, prefixed in words:
                    word = text[word_start:word_stop]
                    # The character each byte of the word came from.
                    origin = [word_start] if prefixed else []
                    for index, char in enumerate(word, word_start):
                        origin += [index] * (1 if char < "\x80" else len(char.encode("utf-8")))
                    data = (" " + word if prefixed else word).encode("utf-8")
                    if (word_spans := self._span_cache.get(data)) is None:
                        word_spans = self.bpe_spans(data)
                        _remember(self._span_cache, data, word_spans)
                    for token_id, first, last in word_spans:
                        spans.append((token_id, origin[first], origin[last - 1] + 1))
        return spans

    def _word_spans(self, text: str, start: int, stop: int) -> Iterator[tuple[int, int, bool]]:
        """`pre_tokenize(text[start:stop])` as (start, stop, whether a space is added
        before it)."""
        if self._numeric:
            cuts = [start, stop]
            for match in self._numeric.finditer(text, start, stop):
                cuts[-1:-1] = match.span()
            segments = [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if a < b]
        else:
            segments = [(start, stop)] if start < stop else []
        for seg_start, seg_stop in segments:
            segment = text[seg_start:seg_stop]
            if self._split == "gpt2":  # the prefix goes before the segment, then the split
                prefixed = self._add_prefix_space and not segment.startswith(" ")
                shift = seg_start - prefixed
                for match in self._pattern.finditer(" " + segment if prefixed else segment):
                    first, last = match.span()
                    yield max(first + shift, seg_start), last + shift, prefixed and first == 0
            else:  # the split, then a prefix before each piece
                for match in self._pattern.finditer(segment):
                    first, last = match.span()
                    add = self._add_prefix_space and not match.group().startswith(" ")
                    yield first + seg_start, last + seg_start, add

    def pre_tokenize(self, text: str) -> list[str]:
        """The words BPE runs on, as HF's pre-tokenizer cuts `text` (no byte mapping)."""
        if self._numeric:
            segments = [s for s in self._numeric.split(text) if s]
        else:  # none for an empty text: HF puts no prefix space before nothing
            segments = [text] if text else []
        words = []
        for segment in segments:
            if self._split == "gpt2":  # ByteLevel(use_regex=True): prefix, then split
                if self._add_prefix_space and not segment.startswith(" "):
                    segment = " " + segment
                words += self._pattern.findall(segment)
            else:  # Split(regex), then ByteLevel(use_regex=False) adds the prefix per piece
                for word in self._pattern.findall(segment):
                    add = self._add_prefix_space and not word.startswith(" ")
                    words.append(" " + word if add else word)
        return words

    def bpe(self, word: bytes) -> list[int]:
        """HF's Word::merge_all: the lowest-ranked merge (leftmost on ties) until none
        applies. Bytes without a token become unk_id (one per run with fuse_unk), or go."""
        if self._ignore_merges:
            token_id = self._vocab.get(word.decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL))
            if token_id is not None:
                return [token_id]
        symbols: list[int | None] = [self._byte_ids[b] for b in word]
        if None in symbols:  # rare: bpe_spans handles them, and keeps the bytes' positions
            return [token_id for token_id, _, _ in self.bpe_spans(word)]
        _merge_all(symbols, self._merges)
        return [s for s in symbols if s is not None]

    def bpe_spans(self, word: bytes) -> list[tuple[int, int, int]]:
        """`bpe(word)` as (id, first byte, end byte) in `word`; a byte without a
        token is unk_id's (one per run with fuse_unk), or in no span without one."""
        if self._ignore_merges:
            token_id = self._vocab.get(word.decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL))
            if token_id is not None:
                return [(token_id, 0, len(word))]
        symbols: list[int | None] = []
        ends: list[int] = []  # each symbol's end byte; its start is in `starts`
        starts: list[int] = []
        dropped = False
        for i, byte in enumerate(word):
            symbol = self._byte_ids[byte]
            if symbol is None:
                if self._unk_id is None:
                    dropped = True
                    continue
                if self._fuse_unk and i and self._byte_ids[word[i - 1]] is None:
                    ends[-1] = i + 1  # the run of unknown bytes stays one unk
                    continue
                symbol = self._unk_id
            symbols.append(symbol)
            starts.append(i)
            ends.append(i + 1)
        _merge_all(symbols, self._merges)
        spans: list[list[int]] = []
        for symbol, start, end in zip(symbols, starts, ends, strict=True):
            if symbol is None:  # merged into the symbol before it
                spans[-1][2] = end
            else:
                spans.append([symbol, start, end])
        if dropped:
            return _shift_past_dropped(word, spans, self._byte_ids)
        return [(symbol, start, end) for symbol, start, end in spans]

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(self.bpe(word.encode("utf-8")))
            _remember(self._cache, word, ids)
        return ids


METASPACE = "\u2581"
_INNER_SPACE_RE = re.compile("[^\u2581]\u2581")
# Where a SentencePiece-style file puts its "▁" (see SentencePieceBPEEncoder).
PREPEND_SCHEMES = ("legacy", "always", "first", "never")


class SentencePieceBPEEncoder(_Encoder):
    """Text to content ids for SentencePiece-style BPE (Llama 2, Mistral, TinyLlama, Phi-3):
    spaces become "▁", a "▁" goes in front, and BPE merges characters, not bytes. A
    character without a token becomes the <0xNN> tokens of its UTF-8 bytes
    (`byte_fallback`), else `unk_id` (one per run with `fuse_unk`), else nothing.

    `prepend` is where the "▁" goes, as the file says it:

    * "legacy": the normalizer Sequence[Prepend("▁"), Replace(" ", "▁")] of the files
      transformers converts with legacy=True: before every piece between added tokens,
      even one that starts with a space (" a" -> "▁▁a");
    * "always", "first", "never": the Metaspace pre-tokenizer's prepend_scheme: before
      each piece that does not start with "▁" already, only before the piece at the
      start of the text, or nowhere.

    `split` is Metaspace's: each "▁" starts a new word (HF's MergedWithNext); without it a
    piece is one word, as it is with the legacy normalizer (no pre-tokenizer). A lone
    surrogate (not valid UTF-8, so HF cannot take it) is read as U+FFFD.

    Example:
        >>> vocab = {"<unk>": 0, "▁": 1, "h": 2, "i": 3, "▁h": 4, "▁hi": 5}
        >>> SentencePieceBPEEncoder(vocab, [("▁", "h"), ("▁h", "i")], prepend="legacy",
        ...     split=False, byte_fallback=False, unk_id=0).encode("hi hi!")
        [5, 5, 0]
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[tuple[str, str]],
        *,
        prepend: str,
        split: bool,
        byte_fallback: bool,
        unk_id: int | None = None,
        fuse_unk: bool = False,
        ignore_merges: bool = False,
        added_tokens: Iterable[AddedToken] = (),
    ) -> None:
        if prepend not in PREPEND_SCHEMES:
            raise ValueError(f"Unknown prepend {prepend!r}. Available: "
                             f"{', '.join(PREPEND_SCHEMES)}.")
        self._vocab = dict(vocab)
        self._merges = _merge_table(self._vocab, merges)
        self._prepend = prepend
        self._split = split
        # HF's BPE::merge_word looks up format!("<{b:#04X}>") for each byte.
        self._byte_ids = ([self._vocab.get(f"<0x{b:02X}>") for b in range(256)]
                          if byte_fallback else None)
        self._unk_id = unk_id
        self._fuse_unk = fuse_unk
        self._ignore_merges = ignore_merges
        # Where no token has a "▁" right after another character (SentencePiece's own
        # vocabs: "▁" begins a piece), no merge can join the characters on either side of a
        # "▁" that follows another character, so a text that is one word is BPE'd in words
        # cut there: the same ids, and words short enough to cache (HF merges the whole text).
        # Not where a character may be dropped (no unk, no byte token for one of its bytes):
        # HF's offsets then shift for the rest of what it BPEs as one word.
        self._cut_words = (
            self._vocab.get(METASPACE) is not None
            and (unk_id is not None or self._byte_ids is not None and None not in self._byte_ids)
            and not any(_INNER_SPACE_RE.search(token) for token in self._vocab))
        self._cache: dict[str, tuple[int, ...]] = {}
        added_tokens = list(added_tokens)
        # The legacy normalizer's "normalized" tokens are matched in the normalized text,
        # as given: runtime.Tokenizer normalizes them first, as HF does ("a b" is matched
        # as "▁a▁b"). A Metaspace file has no normalizer: they are matched in the raw
        # text, in a second pass after the others (as HF does).
        self._raw_added = _AddedTokenSplitter(t for t in added_tokens if not t.normalized)
        self._normalized_added = _AddedTokenSplitter(t for t in added_tokens if t.normalized)

    def content_ids(self, text: str) -> list[int]:
        """Ids of `text`, no special tokens: added tokens, then "▁" for spaces and in
        front, then BPE on each word."""
        ids: list[int] = []
        for word, _, added_id in self._words(text):
            if added_id is not None:
                ids.append(added_id)
            else:
                ids.extend(self._word_ids(word))
        return ids

    def content_spans(self, text: str) -> list[tuple[int, int, int]]:
        """`content_ids` as (id, start, end) in `text`. A "▁" put in front counts as the
        first character after it, and the byte tokens of a character each span it, as
        HF's alignments have them."""
        spans: list[tuple[int, int, int]] = []
        for word, origin, added_id in self._words(text):
            if added_id is not None:
                spans.append((added_id, origin[0], origin[-1] + 1))
                continue
            char_at = [i for i, char in enumerate(word) for _ in range(_utf8_length(char))]
            at = 0
            for token_id, size in self._symbols(word):
                spans.append((token_id, origin[char_at[at]], origin[char_at[at + size - 1]] + 1))
                at += size
        return spans

    def _words(self, text: str) -> Iterator[tuple[str, Sequence[int], int | None]]:
        """(word, the index in `text` of each of its characters, None) for what BPE runs
        on, and ("", (start, stop - 1), id) for an added token at text[start:stop]."""
        if not text.isascii():
            text = _SURROGATE_RE.sub("\ufffd", text)
        for start, stop, added_id in self._raw_added.spans(text):
            if added_id is not None:
                yield "", (start, stop - 1), added_id
                continue
            if self._prepend == "legacy":   # normalize, then find the normalized tokens
                piece = METASPACE + text[start:stop].replace(" ", METASPACE)
                origin: Sequence[int] = [start, *range(start, stop)]
                for first, last, token_id in self._normalized_added.spans(piece):
                    if token_id is not None:
                        yield "", (origin[first], origin[last - 1]), token_id
                    else:
                        yield from self._cut(piece[first:last], origin[first:last])
                continue
            for first, last, token_id in self._normalized_added.spans(text[start:stop]):
                first, last = first + start, last + start
                if token_id is not None:
                    yield "", (first, last - 1), token_id
                    continue
                piece = text[first:last].replace(" ", METASPACE)
                origin = range(first, last)
                if (self._prepend == "always" or self._prepend == "first" and first == 0) \
                        and not piece.startswith(METASPACE):
                    piece, origin = METASPACE + piece, [first, *origin]
                if not self._split:
                    yield from self._cut(piece, origin)
                    continue
                cuts = [i for i, char in enumerate(piece) if char == METASPACE and i]
                for a, b in zip([0, *cuts], [*cuts, len(piece)], strict=True):
                    yield piece[a:b], origin[a:b], None

    def _cut(self, piece: str, origin: Sequence[int]
             ) -> Iterator[tuple[str, Sequence[int], None]]:
        """`piece`, one word to HF, in the words `_cut_words` allows: cut before each "▁"
        that follows another character."""
        if not self._cut_words:
            yield piece, origin, None
            return
        cuts = [match.start() + 1 for match in _INNER_SPACE_RE.finditer(piece)]
        for a, b in zip([0, *cuts], [*cuts, len(piece)], strict=True):
            yield piece[a:b], origin[a:b], None

    def _symbols(self, word: str) -> list[tuple[int, int]]:
        """HF's BPE::merge_word then Word::merge_all: (id, UTF-8 bytes of `word` it
        stands for), in HF's order, which puts a character's byte tokens before the unk
        of unknown characters just before it (HF's order of Word::add; the spans are
        counted in that order too)."""
        if self._ignore_merges and (token_id := self._vocab.get(word)) is not None:
            return [(token_id, len(word.encode("utf-8")))]
        symbols: list[int | None] = []
        sizes: list[int] = []
        unk = 0   # UTF-8 bytes of the unknown characters not yet added
        for char in word:
            size = _utf8_length(char)
            token_id = self._vocab.get(char)
            if token_id is not None:
                if unk:
                    symbols.append(self._unk_id)
                    sizes.append(unk)
                    unk = 0
                symbols.append(token_id)
                sizes.append(size)
                continue
            if self._byte_ids is not None:
                byte_ids = [self._byte_ids[b] for b in char.encode("utf-8")]
                if None not in byte_ids:
                    symbols += byte_ids
                    sizes += [1] * size
                    continue
            if self._unk_id is None:
                continue
            if unk and not self._fuse_unk:
                symbols.append(self._unk_id)
                sizes.append(unk)
                unk = 0
            unk += size
        if unk:
            symbols.append(self._unk_id)
            sizes.append(unk)
        _merge_all(symbols, self._merges)
        out: list[tuple[int, int]] = []
        for symbol, size in zip(symbols, sizes, strict=True):
            if symbol is None:   # merged into the symbol before it
                out[-1] = (out[-1][0], out[-1][1] + size)
            else:
                out.append((symbol, size))
        return out

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(token_id for token_id, _ in self._symbols(word))
            _remember(self._cache, word, ids)
        return ids


# ------------------------------------------------------------------ Unigram
#
# Grapheme clusters (UAX #29), which HF's Precompiled normalizer walks: the classes below
# are Unicode's Grapheme_Cluster_Break and Extended_Pictographic properties at Unicode 16,
# as the unicode-segmentation crate HF builds with (frozen, not read from `unicodedata`;
# made with the `regex` module's tables less what unicodedata2 16.0 has unassigned).
# Only clusters under 6 UTF-8 bytes are normalized whole, so the rules that join longer
# runs only (Indic conjuncts) are left out.
_GCB_EXTEND = """
    300-36F 483-489 591-5BD 5BF 5C1-5C2 5C4-5C5 5C7 610-61A 64B-65F 670 6D6-6DC 6DF-6E4
    6E7-6E8 6EA-6ED 711 730-74A 7A6-7B0 7EB-7F3 7FD 816-819 81B-823 825-827 829-82D
    859-85B 897-89F 8CA-8E1 8E3-902 93A 93C 941-948 94D 951-957 962-963 981 9BC 9BE
    9C1-9C4 9CD 9D7 9E2-9E3 9FE A01-A02 A3C A41-A42 A47-A48 A4B-A4D A51 A70-A71 A75
    A81-A82 ABC AC1-AC5 AC7-AC8 ACD AE2-AE3 AFA-AFF B01 B3C B3E-B3F B41-B44 B4D B55-B57
    B62-B63 B82 BBE BC0 BCD BD7 C00 C04 C3C C3E-C40 C46-C48 C4A-C4D C55-C56 C62-C63 C81
    CBC CBF-CC0 CC2 CC6-CC8 CCA-CCD CD5-CD6 CE2-CE3 D00-D01 D3B-D3C D3E D41-D44 D4D D57
    D62-D63 D81 DCA DCF DD2-DD4 DD6 DDF E31 E34-E3A E47-E4E EB1 EB4-EBC EC8-ECE F18-F19
    F35 F37 F39 F71-F7E F80-F84 F86-F87 F8D-F97 F99-FBC FC6 102D-1030 1032-1037
    1039-103A 103D-103E 1058-1059 105E-1060 1071-1074 1082 1085-1086 108D 109D 135D-135F
    1712-1715 1732-1734 1752-1753 1772-1773 17B4-17B5 17B7-17BD 17C6 17C9-17D3 17DD
    180B-180D 180F 1885-1886 18A9 1920-1922 1927-1928 1932 1939-193B 1A17-1A18 1A1B 1A56
    1A58-1A5E 1A60 1A62 1A65-1A6C 1A73-1A7C 1A7F 1AB0-1ACE 1B00-1B03 1B34-1B3D 1B42-1B44
    1B6B-1B73 1B80-1B81 1BA2-1BA5 1BA8-1BAD 1BE6 1BE8-1BE9 1BED 1BEF-1BF3 1C2C-1C33
    1C36-1C37 1CD0-1CD2 1CD4-1CE0 1CE2-1CE8 1CED 1CF4 1CF8-1CF9 1DC0-1DFF 200C 20D0-20F0
    2CEF-2CF1 2D7F 2DE0-2DFF 302A-302F 3099-309A A66F-A672 A674-A67D A69E-A69F A6F0-A6F1
    A802 A806 A80B A825-A826 A82C A8C4-A8C5 A8E0-A8F1 A8FF A926-A92D A947-A951 A953
    A980-A982 A9B3 A9B6-A9B9 A9BC-A9BD A9C0 A9E5 AA29-AA2E AA31-AA32 AA35-AA36 AA43 AA4C
    AA7C AAB0 AAB2-AAB4 AAB7-AAB8 AABE-AABF AAC1 AAEC-AAED AAF6 ABE5 ABE8 ABED FB1E
    FE00-FE0F FE20-FE2F FF9E-FF9F 101FD 102E0 10376-1037A 10A01-10A03 10A05-10A06
    10A0C-10A0F 10A38-10A3A 10A3F 10AE5-10AE6 10D24-10D27 10D69-10D6D 10EAB-10EAC
    10EFC-10EFF 10F46-10F50 10F82-10F85 11001 11038-11046 11070 11073-11074 1107F-11081
    110B3-110B6 110B9-110BA 110C2 11100-11102 11127-1112B 1112D-11134 11173 11180-11181
    111B6-111BE 111C0 111C9-111CC 111CF 1122F-11231 11234-11237 1123E 11241 112DF
    112E3-112EA 11300-11301 1133B-1133C 1133E 11340 1134D 11357 11366-1136C 11370-11374
    113B8 113BB-113C0 113C2 113C5 113C7-113C9 113CE-113D0 113D2 113E1-113E2 11438-1143F
    11442-11444 11446 1145E 114B0 114B3-114B8 114BA 114BD 114BF-114C0 114C2-114C3 115AF
    115B2-115B5 115BC-115BD 115BF-115C0 115DC-115DD 11633-1163A 1163D 1163F-11640 116AB
    116AD 116B0-116B7 1171D 1171F 11722-11725 11727-1172B 1182F-11837 11839-1183A 11930
    1193B-1193E 11943 119D4-119D7 119DA-119DB 119E0 11A01-11A0A 11A33-11A38 11A3B-11A3E
    11A47 11A51-11A56 11A59-11A5B 11A8A-11A96 11A98-11A99 11C30-11C36 11C38-11C3D 11C3F
    11C92-11CA7 11CAA-11CB0 11CB2-11CB3 11CB5-11CB6 11D31-11D36 11D3A 11D3C-11D3D
    11D3F-11D45 11D47 11D90-11D91 11D95 11D97 11EF3-11EF4 11F00-11F01 11F36-11F3A
    11F40-11F42 11F5A 13440 13447-13455 1611E-16129 1612D-1612F 16AF0-16AF4 16B30-16B36
    16F4F 16F8F-16F92 16FE4 16FF0-16FF1 1BC9D-1BC9E 1CF00-1CF2D 1CF30-1CF46 1D165-1D169
    1D16D-1D172 1D17B-1D182 1D185-1D18B 1D1AA-1D1AD 1D242-1D244 1DA00-1DA36 1DA3B-1DA6C
    1DA75 1DA84 1DA9B-1DA9F 1DAA1-1DAAF 1E000-1E006 1E008-1E018 1E01B-1E021 1E023-1E024
    1E026-1E02A 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF 1E5EE-1E5EF 1E8D0-1E8D6
    1E944-1E94A 1F3FB-1F3FF E0020-E007F E0100-E01EF
"""

_GCB_SPACING_MARK = """
    903 93B 93E-940 949-94C 94E-94F 982-983 9BF-9C0 9C7-9C8 9CB-9CC A03 A3E-A40 A83
    ABE-AC0 AC9 ACB-ACC B02-B03 B40 B47-B48 B4B-B4C BBF BC1-BC2 BC6-BC8 BCA-BCC C01-C03
    C41-C44 C82-C83 CBE CC1 CC3-CC4 CF3 D02-D03 D3F-D40 D46-D48 D4A-D4C D82-D83 DD0-DD1
    DD8-DDE DF2-DF3 E33 EB3 F3E-F3F F7F 1031 103B-103C 1056-1057 1084 17B6 17BE-17C5
    17C7-17C8 1923-1926 1929-192B 1930-1931 1933-1938 1A19-1A1A 1A55 1A57 1A6D-1A72 1B04
    1B3E-1B41 1B82 1BA1 1BA6-1BA7 1BE7 1BEA-1BEC 1BEE 1C24-1C2B 1C34-1C35 1CE1 1CF7
    A823-A824 A827 A880-A881 A8B4-A8C3 A952 A983 A9B4-A9B5 A9BA-A9BB A9BE-A9BF AA2F-AA30
    AA33-AA34 AA4D AAEB AAEE-AAEF AAF5 ABE3-ABE4 ABE6-ABE7 ABE9-ABEA ABEC 11000 11002
    11082 110B0-110B2 110B7-110B8 1112C 11145-11146 11182 111B3-111B5 111BF 111CE
    1122C-1122E 11232-11233 112E0-112E2 11302-11303 1133F 11341-11344 11347-11348
    1134B-1134C 11362-11363 113B9-113BA 113CA 113CC-113CD 11435-11437 11440-11441 11445
    114B1-114B2 114B9 114BB-114BC 114BE 114C1 115B0-115B1 115B8-115BB 115BE 11630-11632
    1163B-1163C 1163E 116AC 116AE-116AF 1171E 11726 1182C-1182E 11838 11931-11935
    11937-11938 11940 11942 119D1-119D3 119DC-119DF 119E4 11A39 11A57-11A58 11A97 11C2F
    11C3E 11CA9 11CB1 11CB4 11D8A-11D8E 11D93-11D94 11D96 11EF5-11EF6 11F03 11F34-11F35
    11F3E-11F3F 1612A-1612C 16F51-16F87
"""

_GCB_PREPEND = """
    600-605 6DD 70F 890-891 8E2 D4E 110BD 110CD 111C2-111C3 113D1 1193F 11941
    11A84-11A89 11D46 11F02
"""

_GCB_CONTROL = """
    0-9 B-C E-1F 7F-9F AD 61C 180E 200B 200E-200F 2028-202E 2060-206F FEFF FFF0-FFFB
    13430-1343F 1BCA0-1BCA3 1D173-1D17A E0000-E001F E0080-E00FF E01F0-E0FFF
"""

_GCB_PICTOGRAPHIC = """
    A9 AE 203C 2049 2122 2139 2194-2199 21A9-21AA 231A-231B 2328 23CF 23E9-23F3
    23F8-23FA 24C2 25AA-25AB 25B6 25C0 25FB-25FE 2600-2604 260E 2611 2614-2615 2618 261D
    2620 2622-2623 2626 262A 262E-262F 2638-263A 2640 2642 2648-2653 265F-2660 2663
    2665-2666 2668 267B 267E-267F 2692-2697 2699 269B-269C 26A0-26A1 26A7 26AA-26AB
    26B0-26B1 26BD-26BE 26C4-26C5 26C8 26CE-26CF 26D1 26D3-26D4 26E9-26EA 26F0-26F5
    26F7-26FA 26FD 2702 2705 2708-270D 270F 2712 2714 2716 271D 2721 2728 2733-2734 2744
    2747 274C 274E 2753-2755 2757 2763-2764 2795-2797 27A1 27B0 27BF 2934-2935 2B05-2B07
    2B1B-2B1C 2B50 2B55 3030 303D 3297 3299 1F004 1F02C-1F02F 1F094-1F09F 1F0AF-1F0B0
    1F0C0 1F0CF-1F0D0 1F0F6-1F0FF 1F170-1F171 1F17E-1F17F 1F18E 1F191-1F19A 1F1AF-1F1E5
    1F201-1F20F 1F21A 1F22F 1F232-1F23A 1F23C-1F23F 1F249-1F25F 1F266-1F321 1F324-1F393
    1F396-1F397 1F399-1F39B 1F39E-1F3F0 1F3F3-1F3F5 1F3F7-1F3FA 1F400-1F4FD 1F4FF-1F53D
    1F549-1F54E 1F550-1F567 1F56F-1F570 1F573-1F57A 1F587 1F58A-1F58D 1F590 1F595-1F596
    1F5A4-1F5A5 1F5A8 1F5B1-1F5B2 1F5BC 1F5C2-1F5C4 1F5D1-1F5D3 1F5DC-1F5DE 1F5E1 1F5E3
    1F5E8 1F5EF 1F5F3 1F5FA-1F64F 1F680-1F6C5 1F6CB-1F6D2 1F6D5-1F6E5 1F6E9 1F6EB-1F6F0
    1F6F3-1F6FF 1F7DC-1F7F0 1F80C-1F80F 1F848-1F84F 1F85A-1F85F 1F888-1F88F 1F8AE-1F8AF
    1F8BC-1F8BF 1F8C2-1F8CF 1F8D9-1F8FF 1F90C-1F93A 1F93C-1F945 1F947-1F9FF 1FA58-1FA5F
    1FA6E-1FAFF 1FC00-1FFFD
"""

(_GB_OTHER, _GB_CR, _GB_LF, _GB_CONTROL, _GB_EXTEND, _GB_ZWJ, _GB_SPACING, _GB_PREPEND,
 _GB_L, _GB_V, _GB_T, _GB_LV, _GB_LVT, _GB_RI, _GB_PICTO) = range(15)


def _class_ranges() -> tuple[list[int], list[int], list[int]]:
    """(starts, stops, class) of the code point ranges above, sorted, for bisect."""
    table = [(0xD, 0xD, _GB_CR), (0xA, 0xA, _GB_LF), (0x200D, 0x200D, _GB_ZWJ),
             (0x1F1E6, 0x1F1FF, _GB_RI), (0x1100, 0x115F, _GB_L), (0xA960, 0xA97C, _GB_L),
             (0x1160, 0x11A7, _GB_V), (0xD7B0, 0xD7C6, _GB_V), (0x16D63, 0x16D63, _GB_V),
             (0x16D67, 0x16D6A, _GB_V), (0x11A8, 0x11FF, _GB_T), (0xD7CB, 0xD7FB, _GB_T)]
    for ranges, kind in ((_GCB_CONTROL, _GB_CONTROL), (_GCB_EXTEND, _GB_EXTEND),
                         (_GCB_SPACING_MARK, _GB_SPACING), (_GCB_PREPEND, _GB_PREPEND),
                         (_GCB_PICTOGRAPHIC, _GB_PICTO)):
        for item in ranges.split():
            if not re.fullmatch("[0-9A-F]+(-[0-9A-F]+)?", item):   # e.g. cut at its "-"
                raise ValueError(f"grapheme class table: {item!r} is not a range")
            first, _, last = item.partition("-")
            table.append((int(first, 16), int(last or first, 16), kind))
    table.sort()
    return [a for a, _, _ in table], [b for _, b, _ in table], [k for _, _, k in table]


_GB_STARTS, _GB_STOPS, _GB_KINDS = _class_ranges()


@functools.lru_cache(maxsize=4096)
def _grapheme_class(char: str) -> int:
    code = ord(char)
    if 0xAC00 <= code <= 0xD7A3:   # Hangul syllables: LV where no trailing jamo, else LVT
        return _GB_LV if (code - 0xAC00) % 28 == 0 else _GB_LVT
    at = bisect.bisect_right(_GB_STARTS, code) - 1
    return _GB_KINDS[at] if at >= 0 and code <= _GB_STOPS[at] else _GB_OTHER


def grapheme_ends(text: str) -> list[int]:
    """Where each extended grapheme cluster of `text` ends (UAX #29's rules GB3-GB13,
    but GB9c).

    Example:
        >>> grapheme_ends("e\\u0301\\r\\nab")
        [2, 4, 5, 6]
    """
    ends: list[int] = []
    if not text:
        return ends
    before = _grapheme_class(text[0])
    picto_zwj = False   # GB11: the cluster so far is Pictographic Extend* ZWJ
    in_picto = before == _GB_PICTO
    regional = 1 if before == _GB_RI else 0
    for i in range(1, len(text)):
        kind = _grapheme_class(text[i])
        if before == _GB_CR and kind == _GB_LF:
            joined = True
        elif before in (_GB_CR, _GB_LF, _GB_CONTROL) or kind in (_GB_CR, _GB_LF, _GB_CONTROL):
            joined = False
        elif before == _GB_L and kind in (_GB_L, _GB_V, _GB_LV, _GB_LVT) \
                or before in (_GB_LV, _GB_V) and kind in (_GB_V, _GB_T) \
                or before in (_GB_LVT, _GB_T) and kind == _GB_T:
            joined = True
        elif kind in (_GB_EXTEND, _GB_ZWJ, _GB_SPACING) or before == _GB_PREPEND:
            joined = True
        elif before == _GB_ZWJ and kind == _GB_PICTO and picto_zwj:
            joined = True
        else:
            joined = before == _GB_RI and kind == _GB_RI and regional % 2 == 1
        if not joined:
            ends.append(i)
        # what GB11 and GB12/13 need of the text so far
        if kind == _GB_PICTO:
            in_picto, picto_zwj = True, False
        elif kind == _GB_ZWJ:
            picto_zwj, in_picto = in_picto, False
        elif kind != _GB_EXTEND:
            in_picto = picto_zwj = False
        else:
            picto_zwj = False
        regional = regional + 1 if kind == _GB_RI else 0
        before = kind
    ends.append(len(text))
    return ends


class Precompiled:
    """HF's Precompiled normalizer (the spm_precompiled crate): SentencePiece's
    `precompiled_charsmap`, a darts-clone double-array trie over UTF-8 whose values
    point into a pool of NUL-terminated replacement strings (NFKC and more, for
    XLM-R, T5, ALBERT...).

    As HF does it: each grapheme cluster under 6 UTF-8 bytes is looked up whole, and
    else each of its characters; a lookup takes the SHORTEST key that is a prefix of
    what is looked up (so the rest of a cluster whose first character is a key goes
    with it: HF's "yes, this seems broken").
    """

    def __init__(self, charsmap: bytes) -> None:
        if len(charsmap) < 4:
            raise ValueError("precompiled_charsmap is too short (no trie size)")
        size = int.from_bytes(charsmap[:4], "little")
        if size % 4 or 4 + size > len(charsmap):
            raise ValueError(f"precompiled_charsmap: a trie of {size} bytes does not fit "
                             f"in {len(charsmap)} bytes")
        if size == 0:   # HF refuses it too
            raise ValueError("precompiled_charsmap has an empty trie")
        self._units = list(struct.unpack(f"<{size // 4}I", charsmap[4:4 + size]))
        self._pool = charsmap[4 + size:]
        try:   # as HF reads it (its replacement strings, NUL-separated)
            self._pool.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"precompiled_charsmap: its replacement strings are not UTF-8 "
                             f"({e.reason} at byte {e.start})") from None
        self._cache: dict[str, str | None] = {}
        # Characters that stay as they are and join no other in a cluster (grapheme
        # class "other", no rule): a text of only those is its own normalization.
        self._plain: set[str] = set()
        self._not_plain: set[str] = set()

    def lookup(self, chunk: str) -> str | None:
        """What `chunk` becomes, or None where no key is a prefix of it."""
        hit = self._cache.get(chunk, False)
        if hit is not False:
            return hit
        units, value = self._units, None
        if units:
            node = _darts_offset(units[0])
            for byte in chunk.encode("utf-8", "surrogatepass"):
                if byte == 0:
                    break
                node ^= byte
                if node >= len(units):
                    break
                unit = units[node]
                if unit & 0x800000FF != byte:
                    break
                node ^= _darts_offset(unit)
                if unit >> 8 & 1:   # a key ends here: the shortest one wins
                    if node < len(units):
                        value = units[node] & 0x7FFFFFFF
                    break
        if value is not None:
            if value >= len(self._pool):
                value = None   # out of the pool: HF would panic; read as no rule
            else:
                end = self._pool.find(b"\0", value)
                raw = self._pool[value:end if end >= 0 else len(self._pool)]
                try:   # a value inside a character: HF would panic; read as no rule
                    value = raw.decode("utf-8")
                except UnicodeDecodeError:
                    value = None
        _remember(self._cache, chunk, value)
        return value

    def normalize(self, text: str, origin: Sequence[int]) -> tuple[str, list[int]]:
        """`text` normalized, and for each of its characters the `origin` of the
        character of `text` it goes with, as HF aligns them (`_transform`)."""
        chars = set(text)
        if not chars <= self._plain:
            for char in chars - self._plain - self._not_plain:
                plain = _grapheme_class(char) == _GB_OTHER and self.lookup(char) is None
                (self._plain if plain else self._not_plain).add(char)
        if chars <= self._plain:
            return text, list(origin)
        changes: list[list] = []   # [char, change], as HF's Precompiled::normalize
        start = 0
        for stop in grapheme_ends(text):
            if stop - start > 1 and len(text[start:stop].encode("utf-8", "surrogatepass")) < 6:
                whole = self.lookup(text[start:stop])
                if whole is not None:
                    _replace(changes, stop - start, whole)
                    start = stop
                    continue
            for char in text[start:stop]:
                new = self.lookup(char)
                if new is None:
                    changes.append([char, 0])
                else:
                    _replace(changes, 1, new)
            start = stop
        return _transform(changes, origin)


def _replace(changes: list[list], replaced: int, new: str) -> None:
    """spm_precompiled's `replace`: `replaced` characters become `new`. Each new one
    takes the place of one replaced (change 0); the extra ones are inserted (1); where
    fewer come out, the last change so far (maybe an earlier character's) removes the
    rest. Nothing so far to carry a removal: the removed characters stay unconsumed, and
    every character after them goes with the one before it (as HF has it)."""
    changes.extend([char, 0] for char in new)
    diff = len(new) - replaced
    if diff > 0:
        for change in changes[len(changes) - diff:]:
            change[1] = 1
    elif diff < 0 and changes:
        changes[-1][1] += diff


def _transform(changes: Sequence[Sequence], origin: Sequence[int]) -> tuple[str, list[int]]:
    """HF's NormalizedString::transform: each (char, change) with change <= 0 takes the
    next old character's alignment and drops -change more; change 1 is inserted, with the
    alignment of the old character before (-1, HF's (0, 0), where there is none)."""
    chars: list[str] = []
    where: list[int] = []
    old = 0
    for char, change in changes:
        if change > 0:
            where.append(origin[old - 1] if old > 0 else -1)
        else:
            where.append(origin[old])
            old += 1 - change
        chars.append(char)
    return "".join(chars), where


def _darts_offset(unit: int) -> int:
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)


# A Unigram normalizer step, as UnigramEncoder takes it: ("precompiled", charsmap bytes),
# ("strip", strip_left, strip_right), ("replace_string", string, content) or
# ("replace_regex", regex, content): HF's Precompiled, Strip and Replace (String or Regex).
NormalizerStep = tuple


def _compiled_steps(steps: Iterable[NormalizerStep]) -> tuple[tuple, ...]:
    """`steps` with the charsmaps parsed and the patterns compiled."""
    compiled = []
    for step in steps:
        kind, *args = step if isinstance(step, tuple | list) and step else (None,)
        if kind == "precompiled" and len(args) == 1 and isinstance(args[0], bytes | bytearray):
            compiled.append((kind, Precompiled(bytes(args[0]))))
        elif kind == "strip" and len(args) == 2 and all(isinstance(a, bool) for a in args):
            compiled.append((kind, args[0], args[1]))
        elif kind in ("replace_string", "replace_regex") and len(args) == 2 \
                and all(isinstance(a, str) for a in args):
            if kind == "replace_string" and not args[0]:
                raise ValueError("a Replace pattern that is an empty string is not supported")
            try:
                pattern = re.compile(re.escape(args[0]) if kind == "replace_string" else args[0])
            except (re.error, TypeError) as e:
                raise ValueError(f"a Replace pattern {args[0]!r:.80} that Python's re "
                                 f"cannot read ({e})") from None
            if pattern.fullmatch(""):
                raise ValueError(f"a Replace pattern that matches nothing ({args[0]!r}) "
                                 "is not supported")
            compiled.append(("replace", pattern, args[1]))
        else:
            raise ValueError(f"unknown normalizer step {step!r:.80}; expected "
                             "('precompiled', bytes), ('strip', left, right), "
                             "('replace_string', string, content) or "
                             "('replace_regex', regex, content)")
    return tuple(compiled)


def unigram_normalizer(normalizers: Iterable[NormalizerStep]) -> Callable[[str], str]:
    """The normalizer of `normalizers` as a function of a text (what a "normalized" added
    token is matched as); a ValueError for a step it cannot run.

    Example:
        >>> unigram_normalizer([("strip", True, True), ("replace_regex", " {2,}", " ")])(
        ...     "  a   b ")
        'a b'
    """
    steps = _compiled_steps(normalizers)
    return lambda text: _normalize_steps(steps, text, range(len(text)))[0]


def _normalize_steps(steps: Sequence[NormalizerStep], text: str, origin: Sequence[int]
                     ) -> tuple[str, Sequence[int]]:
    """HF's normalizers.Sequence of `steps` on `text`, carrying `origin` along."""
    for step in steps:
        kind = step[0]
        if kind == "precompiled":
            text, origin = step[1].normalize(text, origin)
        elif kind == "strip":
            first = len(text) - len(_LEADING_WS_RE.sub("", text, count=1)) if step[1] else 0
            last = _TRAILING_WS_RE.search(text).start() if step[2] else len(text)
            last = max(last, first)
            text, origin = text[first:last], origin[first:last]
        elif kind == "replace":
            pattern, content = step[1], step[2]
            matches = (match.span() for match in pattern.finditer(text))
            pieces, where, at = [], [], 0
            for start, stop in matches:
                pieces.append(text[at:start])
                where.extend(origin[at:start])
                pieces.append(content)
                # HF's NormalizedString::replace: the new characters go with the last
                # one replaced (or with the one before them, where nothing was replaced)
                anchor = stop - 1 if stop > start else start - 1
                where.extend([origin[anchor] if anchor >= 0 else -1] * len(content))
                at = stop
            pieces.append(text[at:])
            where.extend(origin[at:])
            text, origin = "".join(pieces), where
        else:
            raise ValueError(f"unknown normalizer step {kind!r}")
    return text, origin


_LEADING_WS_RE = re.compile(f"[{_WHITESPACE}]*")
_TRAILING_WS_RE = re.compile(f"[{_WHITESPACE}]*\\Z")

# HF's unigram/model.rs: an unknown character scores this far below the lowest piece.
_UNK_PENALTY = 10.0


class UnigramEncoder(_Encoder):
    """Text to content ids for Unigram files (XLM-R, T5, multilingual-e5, ALBERT-style
    SentencePiece): normalize (Precompiled, Strip, Replace), "▁" for spaces and in
    front (Metaspace), then the highest-scoring split of each word into vocab pieces
    (Viterbi, as HF's Unigram::encode_optimized). Runs of characters no piece covers
    become one `unk_id`, or their <0xNN> byte tokens (`byte_fallback`).

    `pieces` is the file's vocab: (piece, score), the id being the index. `normalizers`
    are the steps of the file's normalizer (`NormalizerStep`). "Normalized" `added_tokens`
    are matched in the normalized text, as given (normalize them: `unigram_normalizer`).
    `prepend` and `split` are the Metaspace pre-tokenizer's prepend_scheme and split;
    `whitespace_split` puts a WhitespaceSplit before it (older XLM-R files), which
    cuts the text at whitespace and drops it.

    Example:
        >>> pieces = [("<unk>", 0.0), ("▁", -2.0), ("a", -3.0), ("b", -3.0), ("▁ab", -4.0)]
        >>> UnigramEncoder(pieces, unk_id=0, normalizers=(), prepend="always",
        ...                split=True).encode("ab  ba!")
        [4, 1, 1, 3, 2, 0]
    """

    def __init__(
        self,
        pieces: Sequence[tuple[str, float]],
        *,
        unk_id: int,
        normalizers: Sequence[NormalizerStep],
        prepend: str,
        split: bool,
        whitespace_split: bool = False,
        byte_fallback: bool = False,
        added_tokens: Iterable[AddedToken] = (),
    ) -> None:
        if prepend not in PREPEND_SCHEMES[1:]:
            raise ValueError(f"Unknown prepend {prepend!r}. Available: "
                             f"{', '.join(PREPEND_SCHEMES[1:])}.")
        self._vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        self._scores = [float(score) for _, score in pieces]
        self._lengths = sorted({len(piece) for piece in self._vocab if piece})
        self._unk_id = unk_id
        self._unk_score = min(self._scores, default=0.0) - _UNK_PENALTY
        self._byte_ids = ([self._vocab.get(f"<0x{b:02X}>") for b in range(256)]
                          if byte_fallback else None)
        self._byte_tokens = {i: f"<0x{b:02X}>" for b, i in enumerate(self._byte_ids or ())
                             if i is not None}
        self._steps = _compiled_steps(normalizers)
        self._prepend = prepend
        self._split = split
        self._whitespace_split = whitespace_split
        self._cache: dict[str, tuple[tuple[int, int, int], ...]] = {}
        added_tokens = list(added_tokens)
        # "Normalized" tokens are matched in the normalized text, and given normalized, as
        # HF matches them (runtime.Tokenizer normalizes them: `unigram_normalizer`).
        self._raw_added = _AddedTokenSplitter(t for t in added_tokens if not t.normalized)
        self._normalized_added = _AddedTokenSplitter(t for t in added_tokens if t.normalized)

    def normalize(self, text: str) -> str:
        return _normalize_steps(self._steps, text, range(len(text)))[0]

    def content_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for word, _, added_id in self._words(text):
            if added_id is not None:
                ids.append(added_id)
            else:
                ids.extend(token_id for token_id, _, _ in self._pieces(word))
        return ids

    def content_spans(self, text: str) -> list[tuple[int, int, int]]:
        """`content_ids` as (id, start, end) in `text`, as HF's offsets: a piece spans
        the characters its first and last characters came from (a "▁" put in front or
        for spaces goes with the character after it, or with the space)."""
        return [(token_id, start, end) for token_id, start, end, _ in self._tokens(text)]

    def content_values(self, text: str) -> list[str]:
        """The text of each token of `content_ids` as HF's Encoding.tokens has it (what
        a post-processor's offset trimming reads): a piece as written, an unknown run as
        the text it covers, an added token as matched (with what lstrip/rstrip took)."""
        return [value for _, _, _, value in self._tokens(text)]

    def _tokens(self, text: str) -> Iterator[tuple[int, int, int, str]]:
        for word, origin, added_id in self._words(text):
            if added_id is not None:
                word, origin = origin[2], origin[:2]
            pieces = ((added_id, 0, 2),) if added_id is not None else self._pieces(word)
            for token_id, start, stop in pieces:
                first, last = origin[start], origin[stop - 1]   # -1: HF's (0, 0)
                value = word if added_id is not None else (
                    word[start:stop] if token_id not in self._byte_tokens
                    else self._byte_tokens[token_id])
                yield token_id, max(first, 0), last + 1 if last >= 0 else 0, value

    def _words(self, text: str) -> Iterator[tuple[str, Sequence[int], int | None]]:
        """(word, the index in `text` of each of its characters, None) for each word
        the Viterbi runs on, and ("", (start, stop - 1, the text matched), id) for an
        added token."""
        if not text.isascii():
            text = _SURROGATE_RE.sub("\ufffd", text)
        for start, stop, added_id in self._raw_added.spans(text):
            if added_id is not None:
                yield "", (start, stop - 1, text[start:stop]), added_id
                continue
            normal, origin = _normalize_steps(self._steps, text[start:stop],
                                              range(start, stop))
            for first, last, token_id in self._normalized_added.spans(normal):
                if token_id is not None:
                    yield "", (origin[first], origin[last - 1], normal[first:last]), token_id
                    continue
                piece, where = normal[first:last], origin[first:last]
                if not self._whitespace_split:
                    yield from self._metaspace(piece, where)
                    continue
                for match in _NON_WHITESPACE_RE.finditer(piece):
                    a, b = match.span()
                    yield from self._metaspace(piece[a:b], where[a:b])

    def _metaspace(self, piece: str, origin: Sequence[int]
                   ) -> Iterator[tuple[str, Sequence[int], None]]:
        """HF's Metaspace pre-tokenizer on one piece: spaces become "▁", one goes in
        front (by the prepend scheme: "first" where the piece's first character goes
        with the text's first), and with `split` each "▁" starts a word."""
        if not piece:
            return
        piece = piece.replace(" ", METASPACE)
        if (self._prepend == "always" or self._prepend == "first" and origin[0] <= 0) \
                and not piece.startswith(METASPACE):
            piece, origin = METASPACE + piece, [origin[0], *origin]
        if not self._split:
            yield piece, origin, None
            return
        cuts = [i for i, char in enumerate(piece) if char == METASPACE and i]
        for a, b in zip([0, *cuts], [*cuts, len(piece)], strict=True):
            yield piece[a:b], origin[a:b], None

    def _pieces(self, word: str) -> tuple[tuple[int, int, int], ...]:
        """(id, start, stop) in `word` of its best split (cached)."""
        found = self._cache.get(word)
        if found is None:
            found = tuple(self._viterbi(word))
            _remember(self._cache, word, found)
        return found

    def _viterbi(self, word: str) -> Iterator[tuple[int, int, int]]:
        """HF's Unigram::encode_optimized on one word, then Unigram::tokenize's ids.

        best[i] is the best path over word[:i]: (score, where its last piece starts,
        that piece's id). A piece replaces the path to its end only when it scores
        strictly higher, so among equals the first found wins: the shortest piece from
        the earliest start. A character no single-character piece covers gets the unk
        score; runs of unk pieces are fused into one."""
        n = len(word)
        best: list[tuple[float, int, int] | None] = [None] * (n + 1)
        best[0] = (0.0, 0, 0)
        vocab, scores = self._vocab, self._scores
        for start in range(n):
            base = best[start][0] if best[start] is not None else 0.0
            single = False
            for length in self._lengths:   # the lengths pieces have, shortest first
                stop = start + length
                if stop > n:
                    break
                token_id = vocab.get(word[start:stop])
                if token_id is None:
                    continue
                single = single or stop == start + 1
                score = scores[token_id] + base
                target = best[stop]
                if target is None or score > target[0]:
                    best[stop] = (score, start, token_id)
            if not single:
                score = self._unk_score + base
                target = best[start + 1]
                if target is None or score > target[0]:
                    best[start + 1] = (score, start, self._unk_id)
        pieces: list[tuple[int, int, int]] = []
        stop = n
        while stop > 0:
            _, start, token_id = best[stop]
            if token_id == self._unk_id and pieces and pieces[-1][0] == self._unk_id \
                    and pieces[-1][1] == stop:   # fuse_unk: join the run of unk pieces
                pieces[-1] = (token_id, start, pieces[-1][2])
            else:
                pieces.append((token_id, start, stop))
            stop = start
        pieces.reverse()
        for token_id, start, stop in pieces:
            yield from self._piece_ids(word, token_id, start, stop)

    def _piece_ids(self, word: str, token_id: int, start: int, stop: int
                   ) -> Iterator[tuple[int, int, int]]:
        """Unigram::tokenize: a piece's id, or, for a (fused) unknown run, its id if the
        vocab has the run, else its byte tokens (each spanning the whole run) where
        `byte_fallback` has all of them, else unk."""
        if token_id == self._unk_id:
            text = word[start:stop]
            found = self._vocab.get(text)
            if found is not None:
                token_id = found
            elif self._byte_ids is not None:
                byte_ids = [self._byte_ids[b] for b in text.encode("utf-8")]
                if None not in byte_ids:
                    for byte_id in byte_ids:
                        yield byte_id, start, stop
                    return
        yield token_id, start, stop


def _utf8_length(char: str) -> int:
    code = ord(char)
    return 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4
