"""C twin of `runtime._tokenizer_py` (runtime/_tokenizer_c.c): same ids for every str."""

from collections.abc import Iterable, Mapping, Sequence

from ._tokenizer_py import AddedToken

class WordPieceEncoder:
    """Text to content ids (no special tokens) with BERT normalization and WordPiece.

    Takes what `_tokenizer_py.WordPieceEncoder` takes; ids come back as `int`.
    Threads may share one: encoding releases the GIL, and all it writes is its
    word caches (pieces of up to 22 UTF-8 bytes and their ids; 1 MB for each
    thread that encodes at the same time as others, up to 8, made when first
    needed and kept), each guarded by a lock that is only ever try-locked.
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
    ) -> None: ...
    def encode(
        self,
        text: str,
        /,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        max_content: int | None = None,
    ) -> list[int]:
        """`[*prefix, *content_ids[:max_content], *suffix]`, where content_ids are
        `text`'s (added tokens, then normalize/pre-tokenize/WordPiece);
        runtime.Tokenizer passes its special tokens and truncation budget."""
    def encode_batch(
        self,
        texts: Iterable[str],
        /,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        max_content: int | None = None,
    ) -> list[list[int]]:
        """`[*prefix, *encode(text)[:max_content], *suffix]` of each text, in one call
        that releases the GIL throughout (runtime.Tokenizer passes its special tokens
        and truncation budget).

        A big batch is split into contiguous runs of texts encoded on several
        threads at once (one per 32k chars, at most 8 and the usable CPUs).
        """

class BPEEncoder:
    """Text to content ids with a byte-level pre-tokenizer and BPE merges.

    Takes what `_tokenizer_py.BPEEncoder` takes (token ids below 2**24). Threads
    may share one: encoding releases the GIL, and all it writes is its word
    caches (words of up to 22 UTF-8 bytes and their ids; 1 MB for each thread
    that encodes at the same time as others, up to 8, made when first needed
    and kept), each guarded by a lock that is only ever try-locked.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[Sequence[str]],
        *,
        split: str,
        individual_digits: bool,
        add_prefix_space: bool,
        ignore_merges: bool,
        unk_id: int | None = None,
        fuse_unk: bool = False,
        added_tokens: Iterable[AddedToken] = (),
    ) -> None: ...
    def encode(
        self,
        text: str,
        /,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        max_content: int | None = None,
    ) -> list[int]:
        """`[*prefix, *content_ids[:max_content], *suffix]`, where content_ids are
        `text`'s (added tokens, then pre-tokenize and BPE each word);
        runtime.Tokenizer passes its special tokens and truncation budget."""
    def encode_batch(
        self,
        texts: Iterable[str],
        /,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        max_content: int | None = None,
    ) -> list[list[int]]:
        """`[*prefix, *encode(text)[:max_content], *suffix]` of each text, in one call
        that releases the GIL throughout (runtime.Tokenizer passes its special tokens
        and truncation budget).

        A big batch is split into contiguous runs of texts encoded on several
        threads at once (one per 32k chars, at most 8 and the usable CPUs).
        """

class SentencePieceBPEEncoder:
    """Text to content ids for SentencePiece-style BPE (Llama 2, Mistral): "\u2581" for
    spaces and in front, merges of characters, <0xNN> byte tokens for the others.

    Takes what `_tokenizer_py.SentencePieceBPEEncoder` takes (token ids below 2**24);
    threads may share one, as a BPEEncoder.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[Sequence[str]],
        *,
        prepend: str,
        split: bool,
        byte_fallback: bool,
        unk_id: int | None = None,
        fuse_unk: bool = False,
        ignore_merges: bool = False,
        added_tokens: Iterable[AddedToken] = (),
    ) -> None: ...
    def encode(
        self,
        text: str,
        /,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        max_content: int | None = None,
    ) -> list[int]:
        """`[*prefix, *content_ids[:max_content], *suffix]`, where content_ids are
        `text`'s (added tokens, then "\u2581" and BPE on each word)."""
    def encode_batch(
        self,
        texts: Iterable[str],
        /,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        max_content: int | None = None,
    ) -> list[list[int]]:
        """`encode` of each text in one call that releases the GIL throughout, a big
        batch on several threads, as BPEEncoder's."""

class UnigramEncoder:
    """Text to content ids for Unigram files (XLM-R, T5): the Precompiled, Strip and Replace
    normalizer, Metaspace, then the best-scoring split into pieces.

    Takes what `_tokenizer_py.UnigramEncoder` takes ("normalized" added tokens given
    normalized); raises NotImplementedError for what it does not run: the "first" prepend
    scheme, a Replace regex other than a run of one char ("c{n,}"). Threads may share one,
    as a BPEEncoder.
    """

    def __init__(
        self,
        pieces: Sequence[tuple[str, float]],
        *,
        unk_id: int,
        normalizers: Sequence[tuple],
        prepend: str,
        split: bool,
        whitespace_split: bool = False,
        byte_fallback: bool = False,
        added_tokens: Iterable[AddedToken] = (),
    ) -> None: ...
    def encode(
        self,
        text: str,
        /,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        max_content: int | None = None,
    ) -> list[int]:
        """`[*prefix, *content_ids[:max_content], *suffix]`, where content_ids are
        `text`'s (added tokens, the normalizer, "\u2581", the best split of each word)."""
    def encode_batch(
        self,
        texts: Iterable[str],
        /,
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        max_content: int | None = None,
    ) -> list[list[int]]:
        """`encode` of each text in one call that releases the GIL throughout, a big
        batch on several threads, as BPEEncoder's."""

def batch_threads(chars: int, texts: int, /) -> int:
    """Threads `encode_batch` uses here for `texts` texts of `chars` chars in all."""
