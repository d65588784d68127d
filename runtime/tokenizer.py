"""Tokenizer for Hugging Face `tokenizer.json` files: WordPiece (BERT family),
byte-level BPE (GPT-2, Llama-3, SmolLM2 family), SentencePiece-style BPE (Llama 2,
Mistral, TinyLlama, Phi-3 family) and Unigram (XLM-R, multilingual-e5, T5 family).

Ids match `tokenizers.Tokenizer.from_file(path)` with `no_padding()`, using only
the standard library. This module holds the policy (file parsing, special
tokens, truncation, batching, decoding); the hot loop (added tokens, normalize,
pre-tokenize, WordPiece or BPE) lives in a backend with a tiny surface,
`WordPieceEncoder(vocab, **options)`, `BPEEncoder(vocab, merges, **options)`,
`SentencePieceBPEEncoder(vocab, merges, **options)` and `UnigramEncoder(pieces, **options)`,
each with
`.encode(text) -> list[int]`: the C module `_tokenizer_c` when it is built, else its
pure-Python twin `_tokenizer_py`. The C encoders also have
`encode_batch(texts, prefix, suffix, max_content)`, which `Tokenizer.encode_batch`
uses: it puts the special tokens and truncation decided here around each text's ids.
Offsets (`encode_with_offsets`) come from the twin's `encode_offsets` on either backend.

Example:
    >>> tok = Tokenizer.from_file("all-MiniLM-L6-v2/tokenizer.json")
    >>> tok.encode("Hello world!")
    [101, 7592, 2088, 999, 102]
    >>> tok.decode([101, 7592, 2088, 999, 102])
    'hello world!'
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import sys
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from . import _tokenizer_py
from ._checks import count, integer
from ._tokenizer_py import AddedToken

try:
    from . import _tokenizer_c
except ImportError as e:  # not built on this device: the Python twin is the fallback
    _tokenizer_c = None
    # the extension file is absent (no compiler at install time), or present but unloadable
    _C_MISSING = ("runtime/_tokenizer_c was not built" if "_tokenizer_c" in str(e)
                  and "partially initialized" in str(e) else str(e))

# Backend name -> module with the three encoders, preferred first.
# tests/test_tokenizer.py runs every test on each one available.
BACKENDS: dict[str, ModuleType] = {"python": _tokenizer_py}
if _tokenizer_c is not None:
    BACKENDS = {"c": _tokenizer_c, **BACKENDS}

_warned_no_c = False  # the fallback warning is given once per process

# HF WordPiece decoder `cleanup`: (old, new) replacements, applied in this
# order to each token (with its leading space) on its own.
_DECODE_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" do not", " don't"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _own_copies(vocab, added_tokens, prefix_ids, suffix_ids) -> tuple:
    """The caller's containers copied (what is not one is left for the checks to refuse):
    the offsets twin and a pickle are built from them later, and a vocab the caller edited
    after construction changed those but not encode()."""
    return (dict(vocab) if isinstance(vocab, Mapping) else vocab,
            *(list(v) if isinstance(v, list | tuple) else v
              for v in (added_tokens, prefix_ids, suffix_ids)))


class Tokenizer:
    """Encode text to model input ids and decode ids back to text.

    Usually built with `from_file`; the keyword arguments mirror the fields of
    a tokenizer.json and default to BERT's. `backend` is the hot-loop
    implementation in use: "c" when built, else "python".

    Example:
        >>> tok = Tokenizer(vocab={"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hi": 3},
        ...                 unk_token="[UNK]", prefix_ids=[1], suffix_ids=[2])
        >>> tok.encode_batch(["Hi!", "hi hi"], max_length=3)
        [[1, 3, 2], [1, 3, 2]]
    """

    backend: str = next(iter(BACKENDS))

    def __init__(
        self,
        *,
        vocab: Mapping[str, int],
        unk_token: str,
        continuing_subword_prefix: str = "##",
        max_input_chars_per_word: int = 100,
        clean_text: bool = True,
        handle_chinese_chars: bool = True,
        strip_accents: bool | None = None,
        lowercase: bool = True,
        added_tokens: Sequence[AddedToken] = (),
        prefix_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] = (),
        decode_prefix: str | None = "##",
        decode_cleanup: bool = True,
        pad_id: int | None = None,
        trim_offsets: bool | None = None,
        truncation_side: str = "right",
        backend: str | None = None,
    ) -> None:
        """`prefix_ids`/`suffix_ids` surround every encoded text (e.g. [CLS], [SEP]).

        `strip_accents=None` strips accents when lowercasing, as HF does.
        `decode_prefix=None` means no WordPiece decoder: tokens are joined with spaces.
        `trim_offsets` is the post-processor's (ByteLevel, RobertaProcessing) offset
        trimming: None for none, else its `add_prefix_space`. `truncation_side` is which
        end `max_length` cuts: "right", or "left" (keep a text's last ids; the file's
        truncation.direction "Left").
        """
        # checked here for both backends alike (1.5 was a TypeError in C, taken by the twin)
        max_input_chars_per_word = count(max_input_chars_per_word, "max_input_chars_per_word",
                                         least=0)
        vocab, added_tokens, prefix_ids, suffix_ids = _own_copies(
            vocab, added_tokens, prefix_ids, suffix_ids)
        settings = {k: v for k, v in locals().items() if k not in ("self", "backend")}
        self._settings = lambda: ("WordPiece", settings)   # what a pickle rebuilds it from
        self._choose_backend(backend)
        _check_vocab(vocab, MAX_ID)
        _check_added(added_tokens, pad_id)
        if unk_token not in vocab:
            raise ValueError(
                f"unk_token {unk_token!r} is not in the vocab; "
                "WordPiece needs it for unknown words."
            )
        strip_accents = lowercase if strip_accents is None else strip_accents
        for token in added_tokens:
            if token.normalized and token.content and not _tokenizer_py.bert_normalize(
                token.content, clean_text=clean_text, handle_chinese_chars=handle_chinese_chars,
                strip_accents=strip_accents, lowercase=lowercase,
            ):
                raise ValueError(  # HF matches its empty pattern between every two chars
                    f"added token {token.content!r} is normalized to nothing by this "
                    "tokenizer's normalizer (Hugging Face then splits the text at every "
                    "character); give it \"normalized\": false, or remove it."
                )
        self._set_encoder(
            "WordPieceEncoder",
            vocab,
            unk_token=unk_token,
            continuing_subword_prefix=continuing_subword_prefix,
            max_input_chars_per_word=max_input_chars_per_word,
            clean_text=clean_text,
            handle_chinese_chars=handle_chinese_chars,
            strip_accents=strip_accents,
            lowercase=lowercase,
            added_tokens=added_tokens,
        )
        self._decode_prefix = decode_prefix
        self._decode_cleanup = decode_cleanup
        self._byte_level = False
        self._sentencepiece = None
        self._set_vocab(vocab, added_tokens, prefix_ids, suffix_ids, pad_id, trim_offsets,
                        truncation_side)

    @classmethod
    def byte_level_bpe(
        cls,
        *,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        split: str = "gpt2",
        individual_digits: bool = False,
        add_prefix_space: bool = False,
        ignore_merges: bool = False,
        unk_token: str | None = None,
        fuse_unk: bool = False,
        added_tokens: Sequence[AddedToken] = (),
        prefix_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] = (),
        pad_id: int | None = None,
        trim_offsets: bool | None = None,
        truncation_side: str = "right",
        backend: str | None = None,
    ) -> Tokenizer:
        """A byte-level BPE tokenizer (GPT-2, Llama-3, SmolLM2 family); decodes bytes back.

        `split` is the pre-tokenizer regex, "gpt2" or "llama3" (see
        `_tokenizer_py.SPLIT_PATTERNS`); `individual_digits` cuts digits apart first.

        Example:
            >>> vocab = {c: i for i, c in enumerate(_tokenizer_py.BYTE_TO_CHAR)} | {"hi": 256}
            >>> tok = Tokenizer.byte_level_bpe(vocab=vocab, merges=[("h", "i")])
            >>> tok.encode("hi!"), tok.decode([256, 33])
            ([256, 33], 'hi!')
        """
        vocab, added_tokens, prefix_ids, suffix_ids = _own_copies(
            vocab, added_tokens, prefix_ids, suffix_ids)
        if isinstance(merges, list | tuple):
            merges = list(merges)
        settings = {k: v for k, v in locals().items() if k not in ("cls", "backend")}
        self = cls._checked_bpe("BPE", settings, backend)
        self._set_encoder(
            "BPEEncoder",
            vocab,
            [tuple(merge) for merge in merges],
            split=split,
            individual_digits=individual_digits,
            add_prefix_space=add_prefix_space,
            ignore_merges=ignore_merges,
            unk_id=None if unk_token is None else vocab[unk_token],
            fuse_unk=fuse_unk,
            added_tokens=added_tokens,
        )
        self._byte_level = True
        self._sentencepiece = None
        self._set_vocab(vocab, added_tokens, prefix_ids, suffix_ids, pad_id, trim_offsets,
                        truncation_side)
        return self

    def _choose_backend(self, backend: str | None) -> None:
        global _warned_no_c
        if backend is None:
            if _tokenizer_c is None and not _warned_no_c:
                _warned_no_c = True
                warnings.warn(
                    f"runtime.Tokenizer: the C tokenizer is not available ({_C_MISSING}); "
                    "using the pure-Python backend, 7-60x slower. Install with a C compiler "
                    "and Python's headers (Debian: apt-get install gcc python3-dev; then "
                    "pip install .) to build it.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return
        if backend not in BACKENDS:
            raise ValueError(
                f"Unknown tokenizer backend {backend!r}. Available: {', '.join(BACKENDS)}."
            )
        self.backend = backend

    def _set_encoder(self, kind: str, *args: Any, **options: Any) -> None:
        """The backend's encoder of `kind`, and how to build the Python twin's, which
        computes offsets on either backend (built when first asked for)."""
        self._encoder = getattr(BACKENDS[self.backend], kind)(*args, **options)
        self._offsets_lock = threading.Lock()
        if self.backend == "python":
            self._offsets_encoder: Any = self._encoder
        else:
            self._offsets_encoder = functools.partial(
                getattr(_tokenizer_py, kind), *args, **options
            )

    @classmethod
    def sentencepiece_bpe(
        cls,
        *,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        prepend: str = "legacy",
        split: bool = False,
        byte_fallback: bool = True,
        unk_token: str | None = "<unk>",
        fuse_unk: bool = True,
        ignore_merges: bool = False,
        decoder: str = "fallback",
        decode_strip: tuple[int, int] | None = (1, 0),
        decode_drop_first: bool = True,
        added_tokens: Sequence[AddedToken] = (),
        prefix_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] = (),
        pad_id: int | None = None,
        truncation_side: str = "right",
        backend: str | None = None,
    ) -> Tokenizer:
        """A SentencePiece-style BPE tokenizer (Llama 2, Mistral, TinyLlama, Phi-3 family):
        "▁" for spaces and in front, merges of characters, <0xNN> byte tokens for
        characters the vocab lacks.

        `prepend` and `split` say where the "▁" goes and what a word is
        (`_tokenizer_py.SentencePieceBPEEncoder`). `decoder` is the file's: "fallback",
        HF's Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", *decode_strip)]
        (`decode_strip=None`: no Strip), or "metaspace", HF's Metaspace decoder (which
        drops the "▁" of the first token unless its prepend scheme is "never":
        `decode_drop_first`; byte tokens stay as written).

        Example:
            >>> vocab = {"<unk>": 0, "▁": 1, "h": 2, "i": 3, "▁h": 4, "▁hi": 5}
            >>> tok = Tokenizer.sentencepiece_bpe(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")])
            >>> tok.encode("hi hi"), tok.decode([5, 5])
            ([5, 5], 'hi hi')
        """
        vocab, added_tokens, prefix_ids, suffix_ids = _own_copies(
            vocab, added_tokens, prefix_ids, suffix_ids)
        if isinstance(merges, list | tuple):
            merges = list(merges)
        settings = {k: v for k, v in locals().items() if k not in ("cls", "backend")}
        self = cls._checked_bpe("SentencePieceBPE", settings, backend)
        if decoder not in ("fallback", "metaspace"):
            raise ValueError(f"decoder must be 'fallback' or 'metaspace', got {decoder!r}.")
        if decode_strip is not None:
            decode_strip = tuple(count(n, "decode_strip", least=0) for n in decode_strip)
            if len(decode_strip) != 2:
                raise ValueError(f"decode_strip must be (start, stop) or None, got "
                                 f"{decode_strip!r}.")
        encoder_added = added_tokens
        if prepend == "legacy":   # HF matches a normalized token as the normalizer writes it
            space = _tokenizer_py.METASPACE
            encoder_added = [token._replace(content=space + token.content.replace(" ", space))
                             if token.normalized else token for token in added_tokens]
        self._set_encoder(
            "SentencePieceBPEEncoder",
            vocab,
            [tuple(merge) for merge in merges],
            prepend=prepend,
            split=_flag(split, "split"),
            byte_fallback=_flag(byte_fallback, "byte_fallback"),
            unk_id=None if unk_token is None else vocab[unk_token],
            fuse_unk=_flag(fuse_unk, "fuse_unk"),
            ignore_merges=_flag(ignore_merges, "ignore_merges"),
            added_tokens=encoder_added,
        )
        self._byte_level = False
        self._sentencepiece = (decoder, decode_strip, _flag(decode_drop_first,
                                                            "decode_drop_first"))
        self._set_vocab(vocab, added_tokens, prefix_ids, suffix_ids, pad_id, None,
                        truncation_side)
        return self

    @classmethod
    def unigram(
        cls,
        *,
        pieces: Sequence[tuple[str, float]],
        unk_id: int,
        normalizers: Sequence[tuple] = (),
        prepend: str = "always",
        split: bool = True,
        whitespace_split: bool = False,
        byte_fallback: bool = False,
        decode_drop_first: bool = True,
        added_tokens: Sequence[AddedToken] = (),
        prefix_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] = (),
        pad_id: int | None = None,
        trim_offsets: bool | None = None,
        truncation_side: str = "right",
        backend: str | None = None,
    ) -> Tokenizer:
        """A Unigram tokenizer (XLM-R, multilingual-e5, T5 family): the file's normalizer
        (`normalizers`: `_tokenizer_py.NormalizerStep`s), "▁" for spaces and in front
        (Metaspace: `prepend`, `split`, after a WhitespaceSplit where `whitespace_split`),
        then the best-scoring split of each word into `pieces` ((piece, score); the id
        is the index). Decoded as HF's Metaspace decoder does.

        The C backend runs the layouts transformers writes (XLM-R's, T5's: Precompiled,
        Strip, Replace of a string or of a run of one char such as " {2,}"); for another
        (the "first" prepend scheme, another regex) `backend` None gives the Python twin,
        and "c" is refused with the reason.

        Example:
            >>> pieces = [("<unk>", 0.0), ("▁", -2.0), ("a", -3.0), ("b", -3.0), ("▁ab", -4.0)]
            >>> tok = Tokenizer.unigram(pieces=pieces, unk_id=0)
            >>> tok.encode("ab ba"), tok.decode([4, 1, 3, 2])
            ([4, 1, 3, 2], 'ab ba')
        """
        if isinstance(pieces, list | tuple) and not isinstance(pieces, _CheckedPieces):
            pieces = [tuple(p) if isinstance(p, list | tuple) else p for p in pieces]
        if not isinstance(normalizers, list | tuple):
            raise TypeError(f"normalizers must be a list of steps, got "
                            f"{type(normalizers).__name__}.")
        normalizers = [tuple(step) if isinstance(step, list | tuple) else step
                       for step in normalizers]
        added_tokens, prefix_ids, suffix_ids = _own_copies(
            {}, added_tokens, prefix_ids, suffix_ids)[1:]
        settings = {k: v for k, v in locals().items() if k not in ("cls", "backend")}
        self = cls.__new__(cls)
        self._settings = lambda: ("Unigram", settings)
        self._choose_backend(backend)
        vocab = pieces.vocab if isinstance(pieces, _CheckedPieces) else _unigram_vocab(pieces)
        _check_vocab(vocab, MAX_BPE_ID)
        _check_added(added_tokens, pad_id)
        unk_id = integer(unk_id, "unk_id", what="an int")
        if not pieces:
            raise ValueError("pieces is empty; a Unigram model needs at least its unk piece.")
        if not 0 <= unk_id < len(pieces):
            raise ValueError(f"unk_id {unk_id} is not the id of a piece (0 to "
                             f"{len(pieces) - 1}).")
        for step in normalizers:
            if step[:1] == ("replace_regex",) and not (
                    len(step) == 3 and isinstance(step[1], str) and _RUN_REGEX.fullmatch(step[1])):
                raise ValueError(f"normalizer step {step!r:.80}: a Replace regex is supported "
                                 "as a run of one char, such as \" {2,}\" (HF's Oniguruma "
                                 "and Python's re read others differently).")
        normalize = _tokenizer_py.unigram_normalizer(normalizers)   # checks every step
        # HF matches a "normalized" token as the normalizer writes it, in normalized text.
        encoder_added = [token._replace(content=normalize(token.content))
                         if token.normalized else token for token in added_tokens]
        options = dict(unk_id=unk_id, normalizers=normalizers, prepend=prepend,
                       split=_flag(split, "split"),
                       whitespace_split=_flag(whitespace_split, "whitespace_split"),
                       byte_fallback=_flag(byte_fallback, "byte_fallback"),
                       added_tokens=encoder_added)
        try:
            self._set_encoder("UnigramEncoder", pieces, **options)
        except NotImplementedError as e:   # a layout the C encoder does not run
            if backend is not None:
                raise ValueError(f"The {self.backend!r} tokenizer backend cannot run this "
                                 f"Unigram tokenizer: {e}; use backend='python' (or leave "
                                 "it unset).") from None
            self.backend = "python"
            self._set_encoder("UnigramEncoder", pieces, **options)
        self._byte_level = False
        self._sentencepiece = ("metaspace", None, _flag(decode_drop_first, "decode_drop_first"))
        self._set_vocab(vocab, added_tokens, prefix_ids, suffix_ids, pad_id, trim_offsets,
                        truncation_side)
        return self

    @classmethod
    def _checked_bpe(cls, kind: str, settings: dict[str, Any], backend: str | None
                     ) -> Tokenizer:
        """A Tokenizer that a BPE constructor is building from `settings` (its arguments):
        the backend chosen and the checks both kinds share made."""
        self = cls.__new__(cls)
        self._settings = lambda: (kind, settings)
        self._choose_backend(backend)
        vocab, unk_token = settings["vocab"], settings["unk_token"]
        _check_vocab(vocab, MAX_BPE_ID)
        _check_added(settings["added_tokens"], settings["pad_id"])
        if unk_token is not None and unk_token not in vocab:
            raise ValueError(f"unk_token {unk_token!r} is not in the vocab.")
        return self

    def _set_vocab(
        self, vocab, added_tokens, prefix_ids, suffix_ids, pad_id, trim_offsets, truncation_side
    ) -> None:
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side must be 'right' or 'left', got "
                             f"{truncation_side!r}.")
        # The backends cut on the right; a left cut is made here (`_keep_last`).
        self._truncate_left = truncation_side == "left"
        # Tuples: the C backend reads them without the GIL, so they must not change.
        self._prefix_ids = _id_tuple(prefix_ids, "prefix_ids")
        self._suffix_ids = _id_tuple(suffix_ids, "suffix_ids")
        self._pad_id = pad_id
        self._trim_offsets = trim_offsets
        # Added tokens win over the model vocab in both directions, as in HF.
        self._token_to_id = dict(vocab) | {t.content: t.id for t in added_tokens}
        self._id_to_token = {i: t for t, i in vocab.items()} | {
            t.id: t.content for t in added_tokens
        }
        self._special = frozenset(t.content for t in added_tokens if t.special)
        self._added_ids = frozenset(t.id for t in added_tokens)
        self._normalized_added_ids = frozenset(t.id for t in added_tokens if t.normalized)

    @classmethod
    def from_file(cls, path: str | Path, *, backend: str | None = None) -> Tokenizer:
        """Load a Hugging Face tokenizer.json with a WordPiece, byte-level BPE,
        SentencePiece-style BPE or Unigram model.

        The file's padding and truncation sections are not applied: `encode`
        never pads and truncates only when given `max_length` (on the side that
        truncation.direction names).

        Example:
            >>> Tokenizer.from_file("all-MiniLM-L6-v2/tokenizer.json").vocab_size
            30522
        """
        if backend is not None and backend not in BACKENDS:   # the caller's, not the file's
            raise ValueError(f"Unknown tokenizer backend {backend!r}. Available: "
                             f"{', '.join(BACKENDS)}.")
        if isinstance(path, str) and not path.strip():
            raise ValueError("Tokenizer.from_file: the path is empty.")
        path = Path(path).resolve()   # read again for offsets, maybe from another cwd
        stamp = _stamp(path)
        kind, settings = _read_tokenizer_json(path)
        try:
            if kind == "BPE":
                self = cls.byte_level_bpe(**settings, backend=backend)
            elif kind == "SentencePieceBPE":
                self = cls.sentencepiece_bpe(**settings, backend=backend)
            elif kind == "Unigram":
                self = cls.unigram(**settings, backend=backend)
            else:
                self = cls(**settings, backend=backend)
        except ValueError as e:   # a check the constructors make, of this file's values
            raise ValueError(f"{path}: {e}") from None
        if self.backend != "python":
            # Read the file again if offsets are asked for, rather than keep its vocab
            # and merges (~13 MB for SmolLM2's) for the Python twin.
            self._offsets_encoder = functools.partial(_twin_encoder, path, stamp)
        self._settings = functools.partial(_file_settings, path, stamp)   # likewise
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as the settings it was built from (a file's are read again, so the
        file must not have changed), to be rebuilt on the same backend where that is
        available: a Tokenizer can go to worker processes (multiprocessing, DataLoader).

        Example:
            >>> pickle.loads(pickle.dumps(tok)).encode("hello world") == tok.encode("hello world")
            True
        """
        kind, settings = self._settings()
        return _rebuild, (kind, settings, self.backend)

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids: model vocab plus added tokens."""
        return len(self._id_to_token)

    @property
    def pad_id(self) -> int | None:
        """Id to pad batches with: the file's padding.pad_id, else that of '[PAD]'."""
        return self._pad_id

    def token_to_id(self, token: str) -> int | None:
        """Id of `token`, or None if it is not in the vocabulary."""
        return self._token_to_id.get(token)

    def id_to_token(self, id: int) -> str | None:
        """Token string of `id`, or None if no token has that id."""
        return self._id_to_token.get(id)

    def encode(self, text: str, *, max_length: int | None = None,
               add_special_tokens: bool = True) -> list[int]:
        """Ids of `text` with special tokens added, never padded.

        `max_length` truncates the text's ids (from the right, or from the left
        where the file's truncation.direction is "Left") so that the result,
        special tokens included, has at most that many ids, as HF's
        `enable_truncation(max_length, direction=...)` does. `add_special_tokens=False` leaves
        out the post-processor's tokens ([CLS]/[SEP], a BOS), as HF's does: for
        text that already holds them, such as a rendered chat template.

        Example:
            >>> tok.encode("hello world", max_length=3)
            [101, 7592, 102]
        """
        if not isinstance(text, str):
            hint = ("; decode bytes first, e.g. data.decode('utf-8')"
                    if isinstance(text, (bytes, bytearray, memoryview)) else "")
            raise TypeError(f"encode() expects str, got {type(text).__name__}{hint}.")
        # The backend puts the special tokens around the ids and cuts them to the
        # budget (in C, that saves ~0.3 us of a short text's ~0.8 us).
        if max_length is None:   # the common case first: no truncation to place
            if add_special_tokens is True:
                return self._encoder.encode(text, self._prefix_ids, self._suffix_ids, None)
            if add_special_tokens is False:
                return self._encoder.encode(text, (), (), None)
        _flag(add_special_tokens, "add_special_tokens")   # "no" added them; None did not
        if add_special_tokens:
            budget = self._content_budget(max_length)
            prefix, suffix = self._prefix_ids, self._suffix_ids
        else:
            budget = self._content_budget(max_length, 0)
            prefix, suffix = (), ()
        if self._truncate_left:
            return self._keep_last(self._encoder.encode(text), budget, prefix, suffix)
        return self._encoder.encode(text, prefix, suffix, budget)

    def encode_batch(
        self, texts: Iterable[str], *, max_length: int | None = None
    ) -> list[list[int]]:
        """`encode` of each text, each truncated on its own; no padding.

        Example:
            >>> tok.encode_batch(["hi", "hello world"])
            [[101, 7632, 102], [101, 7592, 2088, 102]]
        """
        if isinstance(texts, str):
            raise TypeError(
                "encode_batch() expects a list of str, got a single str; "
                "use encode(text) or encode_batch([text])."
            )
        if isinstance(texts, (bytes, bytearray, memoryview)):   # iterated, "item 0 is int"
            raise TypeError(
                f"encode_batch() expects a list of str, got {type(texts).__name__}; "
                "decode bytes first, e.g. [data.decode('utf-8')]."
            )
        if isinstance(texts, (AbstractSet, Mapping)):   # iterable, but not what is meant
            why = ("its order is not the one it was built in, and the ids come back in the "
                   "order of the texts; e.g. sorted(texts)" if isinstance(texts, AbstractSet)
                   else "its keys would be encoded, not its values; e.g. list(texts.values())")
            raise TypeError(f"encode_batch() expects a list of str, not a "
                            f"{type(texts).__name__}: {why}.")
        budget = None if max_length is None else self._content_budget(max_length)
        if not hasattr(self._encoder, "encode_batch"):  # the Python twin: one text at a time
            return [self.encode(text, max_length=max_length) for text in _strings(texts)]
        # The C backend encodes the whole batch in one call, without the GIL, and builds
        # each text's list as decided here: special tokens around its ids, cut to the
        # budget. (Done here per text, that took ~90 ns of a short text's ~500 ns.)
        if self._truncate_left and budget is not None:
            return [self._keep_last(ids, budget, self._prefix_ids, self._suffix_ids)
                    for ids in self._encoder.encode_batch(texts, (), (), None)]
        return self._encoder.encode_batch(texts, self._prefix_ids, self._suffix_ids, budget)

    def encode_with_offsets(self, text: str, *, max_length: int | None = None) -> Encoding:
        """`encode(text)`, and for each id the (start, end) of the characters of `text`
        it stands for: HF's `Encoding.offsets`, (0, 0) for special tokens.

        A token covers whole characters, so the tokens of one emoji all span it.
        Computed by the Python twin on either backend (tens of µs for a short text;
        the C backend builds the twin on the first call).

        Example:
            >>> tok.encode_with_offsets("Héllo, world").offsets
            [(0, 0), (0, 5), (5, 6), (7, 12), (0, 0)]
        """
        if not isinstance(text, str):
            raise TypeError(f"encode_with_offsets() expects str, got {type(text).__name__}.")
        budget = None if max_length is None else self._content_budget(max_length)
        encoder = self._offsets_encoder
        if not isinstance(encoder, _tokenizer_py._Encoder):
            with self._offsets_lock:   # built once, however many threads ask first
                if not isinstance(self._offsets_encoder, _tokenizer_py._Encoder):
                    self._offsets_encoder = self._offsets_encoder()
                encoder = self._offsets_encoder
        if self._truncate_left and budget is not None:
            ids, offsets = encoder.encode_offsets(text)
            ids = self._keep_last(ids, budget, self._prefix_ids, self._suffix_ids)
            offsets = self._keep_last(offsets, budget, [(0, 0)] * len(self._prefix_ids),
                                      [(0, 0)] * len(self._suffix_ids))
        else:
            ids, offsets = encoder.encode_offsets(
                text, self._prefix_ids, self._suffix_ids, budget
            )
        if self._trim_offsets is not None:
            self._trim(text, ids, offsets)
        return Encoding(ids, offsets)

    @staticmethod
    def _keep_last(content: list, budget: int, prefix: Sequence, suffix: Sequence) -> list:
        """The last `budget` items of `content` between `prefix` and `suffix`: HF's
        truncation direction "Left" (a single sequence: the ids it drops, it drops from
        the start; the post-processor's tokens are added after)."""
        return [*prefix, *content[max(len(content) - budget, 0):], *suffix]

    def _trim(self, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        """HF's ByteLevel post-processor `trim_offsets`: each token's span loses the
        characters of its leading and trailing spaces ('Ġ' or whitespace), but for a
        single leading space of the first token when the processor adds one. An added
        token's own text is what it matched, with the spaces an lstrip/rstrip took: for a
        normalized one, in the normalized text (a WordPiece normalizer drops controls, some
        of them spaces, and puts spaces around CJK chars)."""
        content = range(len(self._prefix_ids), len(ids) - len(self._suffix_ids))
        values = None
        if isinstance(self._offsets_encoder, _tokenizer_py.UnigramEncoder):
            values = self._offsets_encoder.content_values(text)   # HF's Encoding.tokens
            values = values[len(values) - len(content):] if self._truncate_left else values
        for k, i in enumerate(content):
            if values is not None:
                token = values[k]
            elif ids[i] in self._added_ids:
                token = text[offsets[i][0]:offsets[i][1]]
                if ids[i] in self._normalized_added_ids and not self._byte_level:
                    token = self._offsets_encoder.normalize(token)
            else:
                token = self._id_to_token.get(ids[i], "")
            lead = _LEADING_SPACES_RE.match(token).end()
            trail = len(token) - _TRAILING_SPACES_RE.search(token).start()
            if lead == 0 and trail == 0:
                continue
            start, end = offsets[i]
            first = i == content.start or start == 0
            if first and self._trim_offsets and lead == 1:
                lead = 0
            start = min(start + lead, end)
            if end >= trail:   # HF's `offsets.1 >= trailing_spaces`
                end = max(end - trail, start)
            offsets[i] = start, end

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`, as HF's `Tokenizer.decode` gives it; unknown ids are skipped.

        Example:
            >>> tok.decode([101, 7592, 1010, 2088, 102])
            'hello, world'
        """
        _flag(skip_special_tokens, "skip_special_tokens")
        tokens = []
        for token_id in _ids(ids):
            token = self._id_to_token.get(token_id)
            if token is not None and not (skip_special_tokens and token in self._special):
                tokens.append(token)
        if self._sentencepiece is not None:
            return _decode_sentencepiece(tokens, *self._sentencepiece)
        if self._byte_level:
            # HF's ByteLevel decoder, then String::from_utf8_lossy: a sequence cut
            # inside a multi-byte char ends in U+FFFD (see decode_stream).
            return b"".join(map(_token_bytes, tokens)).decode("utf-8", "replace")
        if self._decode_prefix is None:
            return " ".join(tokens)
        prefix, pieces = self._decode_prefix, []
        for i, token in enumerate(tokens):
            if i:  # the first token is kept as is, even if it starts with the prefix
                token = token[len(prefix) :] if token.startswith(prefix) else " " + token
            if self._decode_cleanup:
                for old, new in _DECODE_CLEANUP:
                    token = token.replace(old, new)
            pieces.append(token)
        return "".join(pieces)

    def decode_stream(self, *, skip_special_tokens: bool = True) -> DecodeStream:
        """An incremental decoder for generation: feed ids one at a time, get text
        only once it is complete (no half of a multi-byte char, no U+FFFD).

        Example:
            >>> stream = tok.decode_stream()      # SmolLM2: ' 😀' is two tokens
            >>> [stream.step(i) for i in tok.encode("ü 😀")]
            ['ü', None, ' 😀']
        """
        return DecodeStream(self, skip_special_tokens=_flag(skip_special_tokens,
                                                            "skip_special_tokens"))

    def _content_budget(self, max_length: int, n_special: int | None = None) -> int:
        """Ids of text `max_length` leaves beside `n_special` special tokens (default: the
        ones this tokenizer adds)."""
        if n_special is None:
            n_special = len(self._prefix_ids) + len(self._suffix_ids)
        max_length = integer(max_length, "max_length", what="an int or None")
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}.")
        if max_length < n_special:
            # HF silently skips truncation here and returns more than max_length ids.
            raise ValueError(
                f"max_length={max_length} leaves no room for the {n_special} special "
                f"tokens this tokenizer adds; use max_length >= {n_special} or None."
            )
        return min(max_length - n_special, sys.maxsize)   # past it: no truncation, in C too


class DecodeStream:
    """Text of a growing id sequence, piece by piece; `Tokenizer.decode_stream` makes one.

    A port of HF's `tokenizers.decoders.DecodeStream` (tokenizer/mod.rs,
    step_decode_stream): it decodes a short window of recent ids, and emits the
    new text once it no longer ends in U+FFFD, so a character split over
    several byte-level tokens comes out whole. Where HF's raises (a <0xNN> byte
    token that turns the bytes of a character already emitted into invalid UTF-8:
    SentencePiece byte fallback), this one goes on from that token, and the text
    it gave then differs from `decode` of all the ids there.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = ""
        self._prefix_index = 0
        # Text of ids already moved out of the window, not yet emitted (see _cut).
        self._owed: list[str] = []

    def step(self, token_id: int) -> str | None:
        """The text `token_id` completes, or None while it is still incomplete."""
        tokenizer = self._tokenizer
        (token_id,) = _ids((token_id,))
        token = tokenizer._id_to_token.get(token_id)
        if token is None or (self._skip and token in tokenizer._special):
            # It decodes to nothing wherever it stands, so it stays out of the window: a
            # run of n of them (a model emitting special tokens) cost O(n²) decoding.
            return None
        decode = tokenizer.decode
        if not self._prefix and self._ids and not self._owed:
            prefix = decode(self._ids, skip_special_tokens=self._skip)
            if not prefix.endswith("\ufffd"):
                self._prefix, self._prefix_index = prefix, len(self._ids)
        self._ids.append(token_id)
        text = decode(self._ids, skip_special_tokens=self._skip)
        # (HF compares UTF-8 lengths; decode's output never holds a lone surrogate.)
        if self._owed:
            incomplete = (text or self._owed[-1]).endswith("\ufffd")
        else:
            incomplete = len(text.encode()) <= len(self._prefix.encode()) or \
                text.endswith("\ufffd")
        if incomplete:
            if len(self._ids) - self._prefix_index > _STREAM_WINDOW:
                self._cut(text)
            return None
        if not text.startswith(self._prefix):
            # HF raises here (DecodeStreamError::InvalidPrefix): a byte token made the bytes
            # of a character already emitted invalid UTF-8 (ByteFallback then writes one
            # U+FFFD per byte of the run). What was emitted stands; the stream goes on from
            # this token, so a model's stray byte does not end a generation.
            pieces, rest = self._owed, self._ids[self._prefix_index:]
            self._ids, self._prefix, self._prefix_index, self._owed = [], "", 0, []
            pieces += [piece for i in rest if (piece := self.step(i)) is not None]
            return "".join(pieces) or None
        new_text = "".join(self._owed) + text[len(self._prefix) :]
        self._owed.clear()
        self._ids = self._ids[self._prefix_index :]  # keep the window short
        self._prefix = decode(self._ids, skip_special_tokens=self._skip)
        self._prefix_index = len(self._ids)
        return new_text

    def flush(self) -> str:
        """The text of the ids `step` still holds back (a character cut off by the end of the
        stream, or a real U+FFFD at its end), as `decode` writes it; the stream starts over."""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        rest = "".join(self._owed) + (text[len(self._prefix):] if text.startswith(self._prefix)
                                      else text)
        self._ids, self._prefix, self._prefix_index, self._owed = [], "", 0, []
        return rest

    def _cut(self, text: str) -> None:
        """Bound the window while ids pile up that do not decode to whole characters (a model
        emitting stray UTF-8 bytes): HF decodes all of them again at every step, so a run of
        n costs O(n²). The older ids' text moves to `_owed`, emitted with the next piece as
        HF emits it, where decoding the window in two parts gives the same text, as it does
        past a byte that cannot continue a character."""
        decode, keep = self._tokenizer.decode, _STREAM_WINDOW // 2
        head = decode(self._ids[:-keep], skip_special_tokens=self._skip)
        tail = decode(self._ids[-keep:], skip_special_tokens=self._skip)
        if tail.endswith("\ufffd") and head + tail == text and head.startswith(self._prefix):
            self._owed.append(head[len(self._prefix) :])
            self._ids, self._prefix, self._prefix_index = self._ids[-keep:], "", 0


# Ids a DecodeStream decodes again at each step, at most (two thirds of it once in a while).
_STREAM_WINDOW = 24


class Encoding(NamedTuple):
    """`Tokenizer.encode_with_offsets`: ids, and the (start, end) characters of each."""

    ids: list[int]
    offsets: list[tuple[int, int]]


# What trim_offsets cuts from a token's ends: byte-level spaces and Rust whitespace.
_SPACES = "\u0120" + _tokenizer_py._WHITESPACE
_LEADING_SPACES_RE = re.compile(f"[{_SPACES}]*")
_TRAILING_SPACES_RE = re.compile(f"[{_SPACES}]*\\Z")


# Token ids: HF stores them as u32; the C backend's byte-level BPE tables take ids below 2**24.
MAX_ID = 2**32
MAX_BPE_ID = 2**24


def _id_tuple(ids: Iterable[int], name: str) -> tuple[int, ...]:
    """`ids` as a tuple of plain ints (numpy ints too), each a valid token id."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a sequence of int ids, got {type(ids).__name__}.")
    out = []
    for i, token_id in enumerate(ids):
        value = integer(token_id, f"{name}[{i}]", what="an int id")
        if not 0 <= value < MAX_ID:
            raise ValueError(f"{name}[{i}] is {value}; a token id lies in [0, 2**32).")
        out.append(value)
    return tuple(out)


def _check_vocab(vocab: Mapping[str, int], top: int, name: str = "vocab") -> None:
    """`vocab` maps token strings to int ids in [0, top): 2**32 (HF's u32), or 2**24 for a
    byte-level BPE (what the C backend's tables index)."""
    if not isinstance(vocab, Mapping):
        raise TypeError(f"{name} must map token strings to int ids, got "
                        f"{type(vocab).__name__}.")
    for token, token_id in vocab.items():
        if not isinstance(token, str) or type(token_id) is not int:
            raise ValueError(f"{name} must map token strings to int ids; it maps "
                             f"{token!r:.40} to {token_id!r:.40}.")
        if not 0 <= token_id < top:
            raise ValueError(f"{name} gives {token!r:.40} the id {token_id}; ids lie in "
                             f"[0, {'2**24' if top == MAX_BPE_ID else '2**32'}) here.")


def _check_added(added_tokens: Sequence[AddedToken], pad_id: int | None) -> None:
    """Added tokens and the pad id are token ids, as the vocab's are."""
    for token in added_tokens:
        if not isinstance(token, AddedToken):
            raise TypeError(f"added_tokens must hold AddedToken, got {type(token).__name__}.")
        if not isinstance(token.content, str) or type(token.id) is not int \
                or not 0 <= token.id < MAX_ID:
            raise ValueError(f"added token {token.content!r:.40} has id {token.id!r}; an id "
                             f"is an int in [0, 2**32).")
    if pad_id is not None and (type(pad_id) is not int or not 0 <= pad_id < MAX_ID):
        raise ValueError(f"pad_id must be None or a token id, an int in [0, 2**32); got "
                         f"{pad_id!r}.")


def _stamp(path: Path) -> tuple[int, int, int]:
    """(size, mtime_ns, CRC-32 of the bytes) of file `path`; (-1, -1, -1) where it is none."""
    try:
        stat, data = path.stat(), path.read_bytes()
    except OSError:
        return (-1, -1, -1)
    return (stat.st_size, stat.st_mtime_ns, zlib.crc32(data))


def _unchanged(path: Path, stamp: tuple[int, int, int]) -> bool:
    """Whether file `path` still holds what it held at `stamp`: the same size and time, or
    (written again, as an update that reinstalls a bundle writes every file) the same bytes."""
    try:
        stat = path.stat()
    except OSError:
        return False
    if (stat.st_size, stat.st_mtime_ns) == stamp[:2]:
        return True
    return stat.st_size == stamp[0] and _stamp(path)[2] == stamp[2]


def _twin_encoder(path: Path, stamp: tuple[int, int, int]) -> _tokenizer_py._Encoder:
    """The Python twin's encoder for the tokenizer.json at `path`, which must not have
    changed since `stamp` (a Tokenizer's C and Python encoders read the same file)."""
    if not _unchanged(path, stamp):
        raise RuntimeError(
            f"{path} changed or went away since this Tokenizer read it; offsets need the "
            "same file. Load the tokenizer again."
        )
    return Tokenizer.from_file(path, backend="python")._encoder


def _file_settings(path: Path, stamp: tuple[int, int, int]) -> tuple[str, dict[str, Any]]:
    """`_read_tokenizer_json` of `path`, which must not have changed since `stamp`."""
    if not _unchanged(path, stamp):
        raise RuntimeError(
            f"{path} changed or went away since this Tokenizer read it; a pickled "
            "Tokenizer is rebuilt from that file. Load the tokenizer again."
        )
    return _read_tokenizer_json(path)


def _flag(value, name: str) -> bool:
    """`value`, a bool: "no" was true and added special tokens, None false."""
    if value is not True and value is not False:
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def _rebuild(kind: str, settings: dict[str, Any], backend: str) -> Tokenizer:
    """The Tokenizer that `Tokenizer.__reduce__` pickled, on `backend` where this process
    has it (else on the default one, which warns when that is the Python twin)."""
    backend_here = backend if backend in BACKENDS else None
    if kind == "BPE":
        return Tokenizer.byte_level_bpe(**settings, backend=backend_here)
    if kind == "SentencePieceBPE":
        return Tokenizer.sentencepiece_bpe(**settings, backend=backend_here)
    if kind == "Unigram":
        return Tokenizer.unigram(**settings, backend=backend_here)
    return Tokenizer(**settings, backend=backend_here)


_MAX_TOKEN_ID = 2**32 - 1   # HF's token ids are u32


def _ids(ids: Iterable[int]) -> Iterator[int]:
    """The token ids of `ids` (numpy ints too), with a clear error for anything else.
    An id past the vocab is skipped as HF skips it; one that HF cannot represent (a
    token id is a u32 there: negative, or 2**32 and up) is an error, as it is in HF."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"decode() expects a list of int ids, got {type(ids).__name__}.")
    if getattr(ids, "ndim", 1) != 1:   # a batch of rows, from generate's arrays
        raise TypeError(f"decode() expects one row of ids, got an array of shape "
                        f"{ids.shape}; decode each row.")
    for i, token_id in enumerate(ids):
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise TypeError(f"decode() expects int ids; item {i} is "
                            f"{type(token_id).__name__}.")
        token_id = token_id.__index__()
        if not 0 <= token_id <= _MAX_TOKEN_ID:
            raise ValueError(f"decode(): token ids are 0 to 2**32 - 1; item {i} is {token_id}.")
        yield token_id


def _strings(texts: Iterable[str]) -> list[str]:
    """`texts` as a list, checked to hold only str, with the C encode_batch's errors."""
    try:
        iterator = iter(texts)
    except TypeError:
        raise TypeError(
            f"encode_batch() expects a list of str, got {type(texts).__name__}"
        ) from None
    texts = list(iterator)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"encode_batch() expects a list of str, item {i} is {type(text).__name__}"
            )
    return texts


def _token_bytes(token: str) -> bytes:
    """HF ByteLevel decoder, per token: the bytes its chars stand for, or, if any
    char is not a byte-level char (an added token like "<x y>"), its UTF-8."""
    try:
        return bytes(map(_CHAR_TO_BYTE.__getitem__, token))
    except KeyError:
        return token.encode("utf-8", "surrogatepass")


def _decode_sentencepiece(tokens: list[str], decoder: str, strip: tuple[int, int] | None,
                          drop_first: bool) -> str:
    """HF's decoders of SentencePiece-style files. "fallback": Replace("▁", " "), then
    ByteFallback (a run of <0xNN> tokens is its bytes as UTF-8, or one U+FFFD per token
    where they are not valid UTF-8), Fuse, then Strip (`strip` spaces off the start and
    end). "metaspace": each "▁" a space, but every "▁" of the first token goes where
    `drop_first` (the prepend scheme is not "never"); byte tokens stay as written."""
    if decoder == "metaspace":
        return "".join(token.replace(_tokenizer_py.METASPACE, "" if i == 0 and drop_first else " ")
                       for i, token in enumerate(tokens))
    pieces: list[str] = []
    run = bytearray()
    for token in tokens:
        byte = _fallback_byte(token)
        if byte is not None:
            run.append(byte)
            continue
        if run:
            pieces.append(_fallback_text(run))
            run.clear()
        pieces.append(token.replace(_tokenizer_py.METASPACE, " "))
    if run:
        pieces.append(_fallback_text(run))
    text = "".join(pieces)
    if strip is not None:
        start, stop = strip
        first = min(len(text) - len(text.lstrip(" ")), start)
        last = len(text) - min(len(text) - len(text.rstrip(" ")), stop)
        text = text[first:max(last, first)]
    return text


def _fallback_byte(token: str) -> int | None:
    """The byte of a ByteFallback token "<0xNN>" (Rust's u8::from_str_radix of NN, which
    takes a "+" sign), else None."""
    if len(token) != 6 or not token.startswith("<0x") or token[5] != ">":
        return None
    digits = token[3:5]
    if not (digits.isascii() and all(c in "0123456789abcdefABCDEF+" for c in digits)) \
            or "+" in digits[1:]:
        return None
    try:
        return int(digits, 16)
    except ValueError:   # "++" or "+" alone
        return None


def _fallback_text(run: bytes) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


_CHAR_TO_BYTE = {char: byte for byte, char in enumerate(_tokenizer_py.BYTE_TO_CHAR)}


_U64_MAX = 2**64 - 1
_POW10 = [float(f"1e{k}") for k in range(309)]


def _serde_float(text: str) -> float:
    """A JSON number with a fraction or exponent, read as HF reads it: serde_json's default
    parser (no float_roundtrip), which takes up to 19 digits as a u64, rounds that to f64,
    then multiplies or divides by a power of ten: sometimes 1 ulp off the nearest f64,
    which Python's float() gives. A Unigram path's score is a sum of piece scores, and
    where two splits tie, that ulp picks the one HF gives (1,893 of 8,002 scores of the
    tests' XLM-R-layout file read otherwise).

    Example:
        >>> _serde_float("-10.773580551147461") == float("-10.773580551147461")
        False
    """
    negative = text.startswith("-")
    mantissa, _, exponent_text = text.lstrip("-").lower().partition("e")
    whole, _, fraction = mantissa.partition(".")
    significand, exponent = 0, int(exponent_text) if exponent_text else 0
    if len(whole) + len(fraction) <= 19:   # fits a u64 (what every score is): at once
        significand, exponent = int(whole + fraction), exponent - len(fraction)
    else:
        for digit in whole:   # past u64: the digit is dropped, and counted in the exponent
            if significand * 10 + int(digit) > _U64_MAX:
                exponent += 1
            else:
                significand = significand * 10 + int(digit)
        for digit in fraction:   # past u64: this digit and the rest are dropped
            if significand * 10 + int(digit) > _U64_MAX:
                break
            significand, exponent = significand * 10 + int(digit), exponent - 1
    value = float(significand)
    while True:
        if abs(exponent) < len(_POW10):
            value = value * _POW10[exponent] if exponent >= 0 else value / _POW10[-exponent]
            break
        if value == 0.0 or exponent > 0:   # serde_json: 0, or "number out of range"
            value = value * math.inf if exponent > 0 and value else value
            break
        value /= 1e308
        exponent += 308
    return -value if negative else value

def _read_tokenizer_json(path: Path) -> tuple[str, dict[str, Any]]:
    """Read and check a tokenizer.json; return its kind ("WordPiece", "BPE" for byte-level,
    "SentencePieceBPE" or "Unigram") and the keyword arguments of `Tokenizer`,
    `Tokenizer.byte_level_bpe`, `Tokenizer.sentencepiece_bpe` or `Tokenizer.unigram`."""
    if not path.is_file():
        if path.is_dir():
            raise FileNotFoundError(f"Tokenizer file '{path}' is a directory; pass the "
                                    "tokenizer.json inside it.")
        if path.exists():
            raise ValueError(f"Tokenizer file '{path}' is not a regular file.")
        raise FileNotFoundError(f"Tokenizer file not found: '{path}'.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_float=_serde_float)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deep" if isinstance(e, RecursionError) else e
        raise ValueError(
            f"{path}: not a valid tokenizer.json ({why}). "
            "Expected the JSON file that Hugging Face tokenizers writes (Tokenizer.save)."
        ) from e
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object at the top level, got {type(data).__name__}."
        )

    model = _field(data, "model", dict, path)
    kind = _check_type(model, "model", ("WordPiece", "BPE", "Unigram"), path)
    if kind == "Unigram":
        pieces = _field(model, "model.vocab", list, path)   # [[piece, score], ...]
        vocab = _unigram_vocab(pieces, path)
        checked = _CheckedPieces(tuple(entry) for entry in pieces)
        checked.vocab = vocab
        settings: dict[str, Any] = {"pieces": checked,
                                    "added_tokens": _added_tokens(data, path, vocab)}
        settings |= _unigram_settings(data, model, path)
    else:
        vocab = _field(model, "model.vocab", dict, path)   # ids: checked by the constructors
        settings = {"vocab": vocab, "added_tokens": _added_tokens(data, path, vocab)}
        if kind == "BPE" and _is_sentencepiece_style(data):
            kind = "SentencePieceBPE"
            settings |= _sentencepiece_settings(data, model, path)
        elif kind == "BPE":
            settings |= _bpe_settings(data, model, path)
        else:
            settings |= _wordpiece_settings(data, model, path)
    added_tokens = settings["added_tokens"]
    settings["prefix_ids"], settings["suffix_ids"] = _special_ids(data.get("post_processor"), path)
    trim_offsets = _trim_offsets(data.get("post_processor"), path)
    if kind == "Unigram" and trim_offsets is not None:   # XLM-R's RobertaProcessing
        settings["trim_offsets"] = trim_offsets
    elif kind != "SentencePieceBPE":
        settings["trim_offsets"] = trim_offsets
    elif trim_offsets is not None:
        raise ValueError(f"{path}: a ByteLevel or RobertaProcessing post_processor (offset "
                         "trimming) with a SentencePiece-style BPE is not supported.")

    truncation = data.get("truncation")
    if isinstance(truncation, dict):   # its max_length is not applied: max_length= is
        direction = _field(truncation, "truncation.direction", str, path, "Right")
        if direction not in ("Right", "Left"):
            raise ValueError(f"{path}: truncation.direction is {direction!r}; expected "
                             f"\"Right\" or \"Left\".")
        settings["truncation_side"] = direction.lower()

    padding = data.get("padding")
    if isinstance(padding, dict):
        settings["pad_id"] = _field(padding, "padding.pad_id", int, path)
        if not 0 <= settings["pad_id"] < MAX_ID:
            raise ValueError(f"{path}: padding.pad_id is {settings['pad_id']}; a token id lies "
                             f"in [0, 2**32).")
    elif kind in ("WordPiece", "Unigram"):   # what transformers pads with
        pad = "[PAD]" if kind == "WordPiece" else "<pad>"
        settings["pad_id"] = next((t.id for t in added_tokens if t.content == pad),
                                  vocab.get(pad))
    return kind, settings


def _wordpiece_settings(data: dict, model: dict, path: Path) -> dict[str, Any]:
    vocab = model["vocab"]
    unk_token = _field(model, "model.unk_token", str, path)
    if unk_token not in vocab:
        raise ValueError(
            f"{path}: model.unk_token {unk_token!r} is not in model.vocab; "
            "WordPiece needs it for unknown words."
        )
    settings: dict[str, Any] = {
        "unk_token": unk_token,
        "continuing_subword_prefix": _field(
            model, "model.continuing_subword_prefix", str, path, "##"
        ),
        "max_input_chars_per_word": _field(model, "model.max_input_chars_per_word", int, path, 100),
    }
    if not 0 <= settings["max_input_chars_per_word"] < 2**64:
        raise ValueError(f"{path}: model.max_input_chars_per_word is "
                         f"{settings['max_input_chars_per_word']}; expected 0 to 2**64 - 1.")

    normalizer = data.get("normalizer")
    if normalizer is None:  # no normalization at all
        settings.update(
            clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=False
        )
    else:
        _check_type(normalizer, "normalizer", ("BertNormalizer",), path)
        for key in ("clean_text", "handle_chinese_chars", "lowercase"):
            settings[key] = _field(normalizer, f"normalizer.{key}", bool, path, True)
        settings["strip_accents"] = _field(
            normalizer, "normalizer.strip_accents", (bool, type(None)), path, None
        )

    _check_type(data.get("pre_tokenizer"), "pre_tokenizer", ("BertPreTokenizer",), path)

    decoder = data.get("decoder")
    if decoder is None:
        settings["decode_prefix"] = None
    else:
        _check_type(decoder, "decoder", ("WordPiece",), path)
        settings["decode_prefix"] = _field(decoder, "decoder.prefix", str, path, "##")
        settings["decode_cleanup"] = _field(decoder, "decoder.cleanup", bool, path, True)
    return settings


def _merges(model: dict, path: Path) -> list[tuple[str, str]]:
    merges = []
    for merge in _field(model, "model.merges", list, path):
        # Older files write "left right", newer ones ["left", "right"].
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(part, str) for part in pair)
        ):
            raise ValueError(f"{path}: model.merges entry {merge!r:.80} is not a pair of tokens.")
        merges.append((pair[0], pair[1]))
    return merges


def _check_bpe_options(model: dict, path: Path, family: str) -> None:
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, ""):
            raise ValueError(
                f"{path}: model.{key} = {model[key]!r} is not supported for {family} "
                f"(the runtime tokenizer supports None)."
            )


# The normalizer of the SentencePiece-style files transformers converts with legacy=True.
_LEGACY_SP_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
]}


def _is_sentencepiece_style(data: dict) -> bool:
    """A BPE file that is not byte-level: "▁" for spaces (Llama 2, Mistral, Phi-3)."""
    pre = data.get("pre_tokenizer")
    return pre is None or isinstance(pre, dict) and pre.get("type") == "Metaspace"


def _prepend_scheme(section: dict, field: str, path: Path) -> str:
    """A Metaspace section's prepend_scheme (older files: add_prefix_space, true by
    default, for "always"); its replacement must be "▁"."""
    if _field(section, f"{field}.replacement", str, path, "\u2581") != "\u2581":
        raise ValueError(f"{path}: {field}.replacement is {section['replacement']!r}; the "
                         "runtime tokenizer supports '\u2581' (SentencePiece's).")
    scheme = section.get("prepend_scheme")
    if scheme is None:
        return "always" if _field(section, f"{field}.add_prefix_space", bool, path,
                                  True) else "never"
    if scheme not in ("always", "first", "never"):
        raise ValueError(f"{path}: {field}.prepend_scheme is {scheme!r}; expected "
                         "\"always\", \"first\" or \"never\".")
    return scheme


def _sentencepiece_settings(data: dict, model: dict, path: Path) -> dict[str, Any]:
    """SentencePiece-style BPE: the legacy normalizer and no pre-tokenizer, or a Metaspace
    pre-tokenizer and no normalizer; a Replace/ByteFallback/Fuse[/Strip] or Metaspace
    decoder."""
    _check_bpe_options(model, path, "SentencePiece-style BPE")
    merges = _merges(model, path)
    vocab = model["vocab"]
    unk_token = _field(model, "model.unk_token", (str, type(None)), path, None)
    if unk_token is not None and unk_token not in vocab:
        raise ValueError(f"{path}: model.unk_token {unk_token!r} is not in model.vocab.")
    normalizer = data.get("normalizer")
    if normalizer == {"type": "Sequence", "normalizers": []}:
        normalizer = None
    pre = data.get("pre_tokenizer")
    if pre is None:
        if normalizer != _LEGACY_SP_NORMALIZER:
            raise ValueError(
                f"{path}: a BPE file without a pre_tokenizer is read as SentencePiece-style "
                "(Llama 2, Mistral), with the normalizer Sequence[Prepend(\"\u2581\"), "
                "Replace(\" \", \"\u2581\")]; this one has "
                f"{json.dumps(normalizer, ensure_ascii=False)[:160]}, which the runtime "
                "tokenizer does not implement."
            )
        prepend, split = "legacy", False
    else:
        if normalizer is not None:
            raise ValueError(
                f"{path}: normalizer {json.dumps(normalizer, ensure_ascii=False)[:120]} is "
                "not supported with a Metaspace pre_tokenizer; the runtime tokenizer "
                "supports none (null) there."
            )
        prepend = _prepend_scheme(pre, "pre_tokenizer", path)
        split = _field(pre, "pre_tokenizer.split", bool, path, True)
    settings: dict[str, Any] = {
        "merges": merges, "prepend": prepend, "split": split, "unk_token": unk_token,
        "byte_fallback": _field(model, "model.byte_fallback", bool, path, False),
        "fuse_unk": _field(model, "model.fuse_unk", bool, path, False),
        "ignore_merges": _field(model, "model.ignore_merges", bool, path, False),
    }
    decoder = data.get("decoder")
    kind = _check_type(decoder, "decoder", ("Metaspace", "Sequence"), path)
    if kind == "Metaspace":
        scheme = _prepend_scheme(decoder, "decoder", path)
        return settings | {"decoder": "metaspace", "decode_drop_first": scheme != "never"}
    steps = decoder.get("decoders")
    shape = [step.get("type") if isinstance(step, dict) else None
             for step in (steps if isinstance(steps, list) else [])]
    strip = None
    if shape[-1:] == ["Strip"]:
        step = steps[-1]
        if _field(step, "decoder.Strip.content", str, path) != " ":
            raise ValueError(f"{path}: decoder Strip.content is {step['content']!r}; the "
                             "runtime tokenizer supports ' '.")
        strip = tuple(_field(step, f"decoder.Strip.{end}", int, path) for end in
                      ("start", "stop"))
        shape = shape[:-1]
    if shape != ["Replace", "ByteFallback", "Fuse"] or steps[0] != {
            "type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}:
        raise ValueError(
            f"{path}: unsupported decoder {json.dumps(decoder, ensure_ascii=False)[:200]}. "
            "The runtime tokenizer supports Metaspace, or Sequence[Replace(\"\u2581\", "
            "\" \"), ByteFallback, Fuse] with or without a Strip(\" \") after them."
        )
    return settings | {"decoder": "fallback", "decode_strip": strip}



# A Replace regex that reads the same in Oniguruma and Python's re: a run of at least n of
# one char that stands for itself ("c{n,}", n >= 1).
_RUN_REGEX = re.compile(r"[^\\^$.|?*+()\[\]{}]\{[1-9][0-9]{0,5},\}")


class _CheckedPieces(list):
    """A Unigram vocab that `_unigram_vocab` has checked, with the piece -> id dict it made:
    the file reader's, so that `Tokenizer.unigram` does not check 250k pieces again."""

    vocab: dict[str, int]


def _unigram_vocab(pieces: Any, path: Path | None = None) -> dict[str, int]:
    """piece -> id (its index) of a Unigram vocab, which must not repeat a piece (HF would
    give it the last id, and score either)."""
    where = f"{path}: model.vocab" if path else "pieces"
    if not isinstance(pieces, list | tuple):
        raise TypeError(f"{where} must be a list of (piece, score) pairs, got "
                        f"{type(pieces).__name__}.")
    vocab: dict[str, int] = {}
    for i, entry in enumerate(pieces):
        if not (isinstance(entry, tuple | list) and len(entry) == 2
                and isinstance(entry[0], str)):
            raise ValueError(f"{where}[{i}] is {entry!r:.80}; expected a (piece, score) pair.")
        if not isinstance(entry[1], int | float) or isinstance(entry[1], bool) \
                or not math.isfinite(entry[1]):
            raise ValueError(f"{where}[{i}] ({entry[0]!r:.40}) has score {entry[1]!r:.40}; "
                             "expected a finite number.")
        if vocab.setdefault(entry[0], i) != i:
            raise ValueError(f"{where} lists the piece {entry[0]!r:.40} twice (ids "
                             f"{vocab[entry[0]]} and {i}).")
    return vocab


def _unigram_settings(data: dict, model: dict, path: Path) -> dict[str, Any]:
    """Unigram: a normalizer of Precompiled, Strip and Replace steps; a Metaspace
    pre-tokenizer (after a WhitespaceSplit in older XLM-R files); a Metaspace decoder."""
    unk_id = _field(model, "model.unk_id", (int, type(None)), path, None)
    if isinstance(unk_id, bool):
        raise ValueError(f"{path}: field 'model.unk_id' must be int, got {unk_id!r}.")
    if unk_id is None:
        raise ValueError(f"{path}: model.unk_id is null; the runtime tokenizer needs a Unigram "
                         "unk token for characters no piece covers (Hugging Face raises on "
                         "them).")
    normalizer = data.get("normalizer")
    steps = [] if normalizer is None else [normalizer]
    if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence":
        steps = _field(normalizer, "normalizer.normalizers", list, path)
    normalizers: list[tuple] = []
    for step in steps:
        kind = _check_type(step, "normalizer", ("Precompiled", "Strip", "Replace"), path)
        if kind == "Precompiled":
            encoded = _field(step, "normalizer.precompiled_charsmap", str, path)
            try:
                normalizers.append(("precompiled", base64.b64decode(encoded, validate=True)))
            except ValueError as e:
                raise ValueError(f"{path}: normalizer.precompiled_charsmap is not base64 "
                                 f"({e}).") from None
        elif kind == "Strip":
            normalizers.append(("strip", *(_field(step, f"normalizer.{end}", bool, path)
                                           for end in ("strip_left", "strip_right"))))
        else:
            pattern = _field(step, "normalizer.pattern", dict, path)
            content = _field(step, "normalizer.content", str, path)
            if isinstance(pattern.get("String"), str):
                normalizers.append(("replace_string", pattern["String"], content))
            elif isinstance(pattern.get("Regex"), str):
                # HF runs Oniguruma, whose syntax differs from Python's re (^ and $ at each
                # line, \w and \s, POSIX classes): only what reads the same in both.
                regex = pattern["Regex"]
                if not _RUN_REGEX.fullmatch(regex):
                    raise ValueError(
                        f"{path}: normalizer Replace.pattern.Regex {regex!r:.60} is not "
                        "supported; the runtime tokenizer runs a run of one char, such as "
                        "\" {2,}\" (what transformers writes), or a String pattern.")
                normalizers.append(("replace_regex", regex, content))
            else:
                raise ValueError(f"{path}: normalizer Replace.pattern {pattern!r:.80} needs a "
                                 "\"String\" or a \"Regex\".")
    pre = data.get("pre_tokenizer")
    whitespace_split = False
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        chain = _field(pre, "pre_tokenizer.pretokenizers", list, path)
        if len(chain) == 2 and isinstance(chain[0], dict) \
                and chain[0].get("type") == "WhitespaceSplit":
            whitespace_split, pre = True, chain[1]
    if not isinstance(pre, dict) or pre.get("type") != "Metaspace":
        raise ValueError(f"{path}: unsupported pre_tokenizer "
                         f"{json.dumps(pre, ensure_ascii=False)[:160]} for a Unigram model; "
                         "the runtime tokenizer supports Metaspace, or "
                         "Sequence[WhitespaceSplit, Metaspace].")
    decoder = data.get("decoder")
    _check_type(decoder, "decoder", ("Metaspace",), path)
    return {
        "unk_id": unk_id, "normalizers": normalizers,
        "prepend": _prepend_scheme(pre, "pre_tokenizer", path),
        "split": _field(pre, "pre_tokenizer.split", bool, path, True),
        "whitespace_split": whitespace_split,
        "byte_fallback": _field(model, "model.byte_fallback", bool, path, False),
        "decode_drop_first": _prepend_scheme(decoder, "decoder", path) != "never",
    }

def _bpe_settings(data: dict, model: dict, path: Path) -> dict[str, Any]:
    """Byte-level BPE: no normalizer, a known pre-tokenizer chain, ByteLevel decoder."""
    vocab = model["vocab"]
    _check_bpe_options(model, path, "byte-level BPE")
    merges = _merges(model, path)
    unk_token = _field(model, "model.unk_token", (str, type(None)), path, None)
    if unk_token is not None and unk_token not in vocab:
        raise ValueError(f"{path}: model.unk_token {unk_token!r} is not in model.vocab.")
    missing_bytes = [c for c in _tokenizer_py.BYTE_TO_CHAR if c not in vocab]
    if missing_bytes and _field(model, "model.byte_fallback", bool, path, False):
        raise ValueError(
            f"{path}: model.byte_fallback is true but {len(missing_bytes)} byte-level tokens "
            f"are missing (e.g. {missing_bytes[0]!r}); the runtime tokenizer does not support "
            "byte fallback in a byte-level vocab."
        )
    normalizer = data.get("normalizer")
    if normalizer == {"type": "Sequence", "normalizers": []}:
        normalizer = None   # an empty sequence normalizes nothing (HF writes it this way)
    if normalizer is not None:
        raise ValueError(
            f"{path}: normalizer {json.dumps(data['normalizer'])[:120]} is not supported for "
            "byte-level BPE; the runtime tokenizer supports files without a normalizer (null)."
        )
    # The pre-tokenizer first: it tells a byte-level file from a SentencePiece-style one.
    pre_tokenizer = _byte_level_pre_tokenizer(data.get("pre_tokenizer"), path)
    _check_type(data.get("decoder"), "decoder", ("ByteLevel",), path)
    return {
        "merges": merges,
        "unk_token": unk_token,
        "fuse_unk": _field(model, "model.fuse_unk", bool, path, False),
        "ignore_merges": _field(model, "model.ignore_merges", bool, path, False),
        **pre_tokenizer,
    }


def _byte_level_pre_tokenizer(pre: Any, path: Path) -> dict[str, Any]:
    """The pre-tokenizer chains we implement, as keyword arguments of BPEEncoder:
    ByteLevel(use_regex=True) (GPT-2), Digits(individual_digits=True) before it
    (SmolLM2), or Split(Llama-3 regex) before ByteLevel(use_regex=False)."""
    steps = pre.get("pretokenizers") if _check_type(
        pre, "pre_tokenizer", ("ByteLevel", "Sequence"), path
    ) == "Sequence" else [pre]
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"{path}: pre_tokenizer.pretokenizers must be a non-empty list.")
    *before, byte_level = steps
    _check_type(byte_level, "pre_tokenizer (last step)", ("ByteLevel",), path)
    settings = {
        "split": "gpt2",
        "individual_digits": False,
        "add_prefix_space": _field(byte_level, "ByteLevel.add_prefix_space", bool, path, True),
    }
    use_regex = _field(byte_level, "ByteLevel.use_regex", bool, path, True)
    kinds = [_check_type(step, "pre_tokenizer step", ("Digits", "Split"), path) for step in before]
    if use_regex and kinds == ["Digits"] and before[0].get("individual_digits") is True:
        settings["individual_digits"] = True
    elif not use_regex and kinds == ["Split"]:
        split = before[0]
        pattern = split.get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        known = {p: name for name, p in _tokenizer_py.SPLIT_PATTERNS.items()}
        if regex not in known:
            raise ValueError(
                f"{path}: pre_tokenizer Split regex {regex!r:.120} is not one the runtime "
                f"tokenizer implements (GPT-2's or Llama-3's, spelled exactly)."
            )
        if split.get("behavior") != "Isolated" or split.get("invert") is not False:
            raise ValueError(
                f"{path}: pre_tokenizer Split needs behavior 'Isolated' and invert false, got "
                f"{split.get('behavior')!r} and {split.get('invert')!r}."
            )
        if known[regex] == "gpt2" and settings["add_prefix_space"]:
            # The encoders put GPT-2's prefix space once before the split, as
            # ByteLevel(use_regex=true) does; after a Split, HF puts one before each piece.
            raise ValueError(
                f"{path}: pre_tokenizer Split(GPT-2 regex) then ByteLevel(add_prefix_space="
                "true, use_regex=false) is not supported (a prefix space before every piece); "
                "ByteLevel(use_regex=true) alone is GPT-2's split with one prefix space."
            )
        settings["split"] = known[regex]
    elif not (use_regex and not kinds):
        raise ValueError(
            f"{path}: unsupported pre_tokenizer {json.dumps(pre)[:200]}. The runtime tokenizer "
            "supports ByteLevel(use_regex=true), Digits(individual_digits=true) then "
            "ByteLevel(use_regex=true), or Split(Llama-3 regex) then ByteLevel(use_regex=false)."
        )
    return settings


def _added_tokens(data: dict, path: Path, vocab: dict[str, int]) -> list[AddedToken]:
    """The file's added tokens with the ids HF gives them when it loads the file, whatever
    their "id" says (HF's AddedVocabulary.add_tokens): a token of the model's vocab takes
    that id, any other the next id past the vocab and the added tokens before it; an empty
    token is dropped, and a repeated one keeps its first id with the last entry's flags
    (lstrip, rstrip, single_word, normalized), and is special if any entry is (HF's
    is_special_token, which decode asks, never forgets one). Files HF wrote agree."""
    added_tokens: list[AddedToken] = []
    ids: dict[str, int] = {}
    for token in _listed_added_tokens(data, path):
        if not token.content:
            continue
        if token.content in ids:
            at = next(i for i, t in enumerate(added_tokens) if t.content == token.content)
            special = token.special or added_tokens[at].special
            added_tokens[at] = token._replace(id=ids[token.content], special=special)
            continue
        if token.content in vocab:
            ids[token.content] = vocab[token.content]
        else:
            top = max(ids.values(), default=None)
            past = top is not None and (top >= len(vocab) or not vocab)
            ids[token.content] = top + 1 if past else len(vocab)
        added_tokens.append(token._replace(id=ids[token.content]))
    return added_tokens


def _listed_added_tokens(data: dict, path: Path) -> list[AddedToken]:
    added_tokens = []
    for entry in _field(data, "added_tokens", list, path, []):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("content"), str)
            or type(entry.get("id")) is not int
        ):
            raise ValueError(
                f"{path}: added_tokens entry {entry!r:.80} needs a str 'content' and an int 'id'."
            )
        if not 0 <= entry["id"] < MAX_ID:
            raise ValueError(f"{path}: added_tokens entry {entry['content']!r:.40} has id "
                             f"{entry['id']}; an id lies in [0, 2**32).")
        special = bool(entry.get("special", False))
        added_tokens.append(
            AddedToken(
                content=entry["content"],
                id=entry["id"],
                special=special,
                single_word=bool(entry.get("single_word", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", not special)),
            )
        )
    return added_tokens


def _special_ids(processor: Any, path: Path) -> tuple[list[int], list[int]]:
    """Ids the post-processor puts before and after a single text."""
    if processor is None:
        return [], []
    supported = ("TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteLevel",
                 "Sequence")
    kind = _check_type(processor, "post_processor", supported, path)
    if kind == "ByteLevel":  # only trims offsets: no ids added
        return [], []
    if kind == "Sequence":  # e.g. Llama-3: [ByteLevel, TemplateProcessing]
        around: tuple[list[int], list[int]] = ([], [])
        for step in _field(processor, "post_processor.processors", list, path):
            before, after = _special_ids(step, path)
            around = (before + around[0], around[1] + after)
        return around
    if kind != "TemplateProcessing":
        # {"cls": ["[CLS]", 101], "sep": ["[SEP]", 102], ...}: [CLS] text [SEP]
        cls, sep = processor.get("cls"), processor.get("sep")
        if not all(isinstance(p, list) and len(p) == 2 and type(p[1]) is int for p in (cls, sep)):
            raise ValueError(
                f"{path}: post_processor ({kind}) needs 'cls' and 'sep' as [token, id] pairs, "
                f"got cls={cls!r}, sep={sep!r}."
            )
        return [cls[1]], [sep[1]]
    # "single": [{"SpecialToken": {"id": "[CLS]"}}, {"Sequence": {"id": "A"}}, ...]
    single = processor.get("single")
    if not isinstance(single, list) or not all(isinstance(p, dict) for p in single) or \
            sum("Sequence" in piece for piece in single) != 1:
        raise ValueError(
            f"{path}: post_processor.single must be a list of objects with exactly one "
            f"Sequence item, "
            f"got {single!r:.200}."
        )
    around: tuple[list[int], list[int]] = ([], [])  # ids before and after the text
    side = 0
    specials = processor.get("special_tokens", {})
    for piece in single:
        if "Sequence" in piece:
            side = 1
            continue
        name = piece.get("SpecialToken", {}).get("id") \
            if isinstance(piece.get("SpecialToken", {}), dict) else None
        entry = specials.get(name, {}) if isinstance(specials, dict) else None
        ids = entry.get("ids") if isinstance(entry, dict) else None
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ValueError(
                f"{path}: post_processor.special_tokens has no ids for {name!r}; "
                "every SpecialToken in post_processor.single needs an entry with 'ids'."
            )
        around[side].extend(ids)
    return around


def _trim_offsets(processor: Any, path: Path) -> bool | None:
    """None if the post-processor leaves offsets as they are, else the `add_prefix_space`
    of the ByteLevel or RobertaProcessing step that trims them."""
    steps = processor.get("processors") if isinstance(processor, dict) else None
    for step in steps if isinstance(steps, list) else [processor]:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind in ("ByteLevel", "RobertaProcessing") and _field(
            step, "post_processor.trim_offsets", bool, path, True
        ):
            return _field(step, "post_processor.add_prefix_space", bool, path, True)
    return None


def _check_type(section: Any, field: str, supported: tuple[str, ...], path: Path) -> str:
    """The section's "type" if it is one of `supported`, else a ValueError saying so."""
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{path}: {field} must be an object with a \"type\" (or null), got "
                         f"{section!r:.80}.")
    kind = section.get("type") if isinstance(section, dict) else None
    if kind not in supported:
        raise ValueError(
            f"{path}: unsupported {field}.type {kind!r}. The runtime tokenizer supports "
            f"{' or '.join(map(repr, supported))} here."
        )
    return kind


_REQUIRED = object()


def _field(
    section: dict, field: str, kind: type | tuple[type, ...], path: Path, default: Any = _REQUIRED
) -> Any:
    """section[last part of `field`], checked against `kind`; `field` is the dotted name."""
    value = section.get(field.rpartition(".")[2], default)
    if value is _REQUIRED:
        raise ValueError(f"{path}: missing field {field!r}.")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = (
            kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        )
        raise ValueError(f"{path}: field {field!r} must be {expected}, got {value!r:.80}.")
    return value
