"""SentencePiece-style BPE (Llama 2, Mistral, TinyLlama, Phi-3) in runtime.tokenizer against
Hugging Face `tokenizers`, on every backend.

No such tokenizer ships offline (the Llama-2 family's files come from the hub), so the
reference is made here, as those files are laid out (`exporter.data.llama_layout_tokenizer`):
HF's BPE trainer on English prose with Llama 2's special tokens <unk> <s> </s> and the 256
<0xNN> byte tokens in the model vocab, saved (1) as transformers converts Llama 2 with legacy=True:
the normalizer Sequence[Prepend("▁"), Replace(" ", "▁")], no pre-tokenizer, byte_fallback
and fuse_unk, the decoder Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)],
"<s> $A"; and (2) with a Metaspace pre-tokenizer instead (legacy=False), each
prepend_scheme, split or not. The texts are English prose (conftest's `prose`), every string of
home-assistant-intents (~65 languages: characters outside the vocab take the byte
tokens), adversarial cases and random text.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")

from _tokenizer_files import hf_tokenizer, write  # noqa: E402

from exporter.data import llama_layout_tokenizer  # noqa: E402
from runtime import _tokenizer_py  # noqa: E402
from runtime.tokenizer import BACKENDS, Tokenizer  # noqa: E402

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the property test is skipped below
    given = None

SPACE = "\u2581"
_rng = random.Random(0)
ALPHABET = ["a", "b", "the", " ", "  ", SPACE, "<s>", "</s>", "<unk>", "日", "é", "e\u0301",
            "\n", "\t", "🚀", "👩‍👩‍👧", "\x00", "ǅ", "Ω", "\ufffd", "Home Assistant", "zz"]
EDGE_CASES = [
    "", " ", "  ", "\t", "\n", SPACE, SPACE * 3, f"{SPACE}x {SPACE}{SPACE}y", " leading",
    "trailing  ", "two  spaces", "<s>", "<s><s>", "</s> x", "x</s>", "a <s> b", "<unk>",
    "日本語のテキスト", "한국어", "🚀👩‍👩‍👧🇩🇪", "e\u0301", "\x00", "\ufffd", "x" * 3000,
    "naïve café", "\u202eRTL\u202c", "a\u200db", "<0x41>", "▁▁▁" * 50,
    *("".join(_rng.choice(ALPHABET) for _ in range(_rng.randrange(1, 14))) for _ in range(2000)),
]


@pytest.fixture(scope="session")
def trained() -> dict:
    """The trained vocab and merges, as a tokenizer.json dict in Llama 2's legacy layout."""
    return llama_layout_tokenizer()


def metaspace(scheme: str, split: bool, decoder: str = "fallback"):
    def edit(data):
        data["normalizer"] = None
        data["pre_tokenizer"] = {"type": "Metaspace", "replacement": SPACE,
                                 "prepend_scheme": scheme, "split": split}
        if decoder == "metaspace":
            data["decoder"] = {"type": "Metaspace", "replacement": SPACE,
                               "prepend_scheme": scheme, "split": split}
    edit.__name__ = f"metaspace_{scheme}{'_split' if split else ''}_{decoder}"
    return edit


def with_added_tokens(data):
    """HF-written added tokens: normalized ones (matched as the normalizer writes them), and
    lstrip / rstrip / single_word ones."""
    n = len(data["model"]["vocab"])
    data["added_tokens"] += [
        {"id": n + i, "content": content, "single_word": single, "lstrip": lstrip,
         "rstrip": rstrip, "normalized": normalized, "special": special}
        for i, (content, normalized, special, lstrip, rstrip, single) in enumerate([
            ("Home Assistant", True, False, False, False, False),
            ("zz", True, False, False, False, False),
            ("<mask>", False, True, True, True, False),
            ("xyz", False, False, False, False, True),
        ])
    ]  # fmt: skip


def no_byte_fallback(data):
    data["model"].update(byte_fallback=False, fuse_unk=True)


def no_byte_fallback_no_fuse(data):
    data["model"].update(byte_fallback=False, fuse_unk=False)


def no_unk(data):
    data["model"].update(byte_fallback=False, unk_token=None)


def some_bytes_missing(data):
    """A byte tokens' run cut short: a character with a missing byte is unk, the byte tokens
    of the next one come before that unk (HF adds a pending unk at the next known char)."""
    for b in range(0x80, 0x90):
        del data["model"]["vocab"][f"<0x{b:02X}>"]


def ignore_merges(data):
    data["model"]["ignore_merges"] = True


def legacy(data):
    pass


def inner_space(data):
    """A token with a "▁" after another character ("s▁", merged first): no cutting the text
    into words at each "▁" (which the encoders do where no token has one), as HF does."""
    vocab = data["model"]["vocab"]
    vocab["s" + SPACE] = max(vocab.values()) + 1
    data["model"]["merges"].insert(0, ["s", SPACE])


def inner_space_metaspace(data):
    metaspace("first", False)(data)
    inner_space(data)


VARIANTS = [
    legacy, metaspace("first", False), metaspace("first", True), metaspace("always", True),
    metaspace("never", False), metaspace("always", False, "metaspace"),
    metaspace("first", True, "metaspace"), metaspace("never", True, "metaspace"),
    with_added_tokens, no_byte_fallback, no_byte_fallback_no_fuse, no_unk, some_bytes_missing,
    ignore_merges, inner_space, inner_space_metaspace,
]  # fmt: skip


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def legacy_file(tmp_path_factory, trained) -> Path:
    return write(tmp_path_factory.mktemp("sp-legacy"), trained)


@pytest.fixture(scope="module")
def tok(legacy_file, backend) -> Tokenizer:
    return Tokenizer.from_file(legacy_file, backend=backend)


@pytest.fixture(scope="module")
def hf(legacy_file):
    return hf_tokenizer(legacy_file)


@pytest.fixture(scope="module")
def real_case(hf, prose, real_texts) -> tuple[list[str], list[list[int]]]:
    texts = prose + real_texts
    return texts, [e.ids for e in hf.encode_batch(texts)]


def test_real_text_matches_hf(tok, real_case):
    texts, expected = real_case
    assert len(texts) > 60_000
    assert tok.encode_batch(texts) == expected
    assert [tok.encode(t) for t in texts[::7]] == expected[::7]


@pytest.mark.parametrize("text", EDGE_CASES[:40], ids=range(40))
def test_edge_cases_match_hf(tok, hf, text):
    assert tok.encode(text) == hf.encode(text).ids


def test_random_text_and_a_megabyte_match_hf(tok, hf, prose):
    assert tok.encode_batch(EDGE_CASES) == [e.ids for e in hf.encode_batch(EDGE_CASES)]
    text = "\n".join(prose)[: 1 << 20]
    assert tok.encode(text) == hf.encode(text).ids


def test_the_llama_layout(tok, hf):
    """What makes it Llama 2's: "▁" in front of each piece (also after a special token, and
    doubled before a leading space), characters outside the vocab as byte tokens, <s> first."""
    assert tok.encode("Hello world")[0] == 1
    ids = tok.encode("<s>a 日", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == [
        "<s>", f"{SPACE}a", SPACE, "<0xE6>", "<0x97>", "<0xA5>"]
    assert [tok.id_to_token(i) for i in tok.encode(" a", add_special_tokens=False)][0] == SPACE
    text = "x 日本 🚀 y"
    assert tok.decode(tok.encode(text)) == text == hf.decode(hf.encode(text).ids)


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.__name__)
def variant_case(request, tmp_path_factory, trained, prose, real_texts):
    """(file, texts, HF encodings) for one variant of the trained file."""
    path = write(tmp_path_factory.mktemp("sp-variant"), trained, request.param)
    rng = random.Random(1)
    inserts = ["<mask>", " <mask> ", "xyz", " xyz ", "Home Assistant", "zz", " zz", "<s>"]
    sample = prose[::20] + real_texts[::7]
    spiced = [text[:cut] + rng.choice(inserts) + text[cut:]
              for text in sample[:2000] for cut in [rng.randrange(len(text) + 1)]]
    texts = sample + spiced + EDGE_CASES
    return path, texts, hf_tokenizer(path).encode_batch(texts)


def test_file_variants_match_hf(variant_case, backend):
    path, texts, expected = variant_case
    tok = Tokenizer.from_file(path, backend=backend)
    hf = hf_tokenizer(path)
    assert tok.encode_batch(texts) == [e.ids for e in expected]
    for text, encoding in list(zip(texts, expected, strict=True))[::5]:
        if len(text) < 2000:
            assert tok.encode_with_offsets(text).offsets == encoding.offsets, text
    ids = [e.ids for e in expected[::3]]
    for skip in (True, False):
        assert [tok.decode(i, skip_special_tokens=skip) for i in ids] == (
            hf.decode_batch(ids, skip_special_tokens=skip))


def test_offsets_match_hf(tok, hf, real_case):
    texts = real_case[0][::11]
    for text, encoding in zip(texts, hf.encode_batch(texts), strict=True):
        assert tok.encode_with_offsets(text).offsets == encoding.offsets, text


@pytest.mark.parametrize("max_length", [0, 1, 2, 5, 64])
def test_truncation_matches_hf(legacy_file, backend, real_case, max_length):
    tok = Tokenizer.from_file(legacy_file, backend=backend)
    hf = hf_tokenizer(legacy_file)
    hf.enable_truncation(max(max_length, 1))
    texts = real_case[0][::50]
    if max_length == 0:   # no room for <s>: refused (HF would give it anyway)
        with pytest.raises(ValueError, match="no room for the 1 special"):
            tok.encode(texts[0], max_length=0)
        return
    assert tok.encode_batch(texts, max_length=max_length) == [
        e.ids for e in hf.encode_batch(texts)]


def test_decode_of_odd_id_sequences_matches_hf(tok, hf):
    """Random ids: byte tokens that make no character (one U+FFFD each), byte tokens
    around special ones, a "▁" first (Strip takes one space), unknown ids."""
    rng = random.Random(2)
    size = hf.get_vocab_size()
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    pool = list(range(size)) + byte_ids * 30 + [0, 1, 2] * 50 + [size + 3]
    sequences = [[rng.choice(pool) for _ in range(rng.randrange(0, 25))] for _ in range(3000)]
    sequences += [[tok.token_to_id(SPACE)] * 3, [byte_ids[0xE6], 1, byte_ids[0x97]]]
    for skip in (True, False):
        assert [tok.decode(ids, skip_special_tokens=skip) for ids in sequences] == [
            hf.decode(ids, skip_special_tokens=skip) for ids in sequences]


def test_decode_stream_matches_hf(tok, hf, stream_window):
    """Generation's incremental decoding: a character split over byte tokens comes out
    whole, the leading space that Strip removes comes out once, as HF's DecodeStream."""
    rng = random.Random(3)
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    words = tok.encode("naïve 家 👨‍👩‍👧 ok</s> two  spaces", add_special_tokens=False)
    # Runs of stray bytes and of skipped tokens: decoded in a bounded window, not again
    # whole at each step as HF does.
    assert stream_window(tok, hf, [[byte_ids[0x80]] * 400 + words, [2] * 300 + words]) <= 32
    sequences = [words]
    for _ in range(400):
        pool = byte_ids[0x80:] * 2 + words + [1, 2, tok.token_to_id(SPACE)]
        sequences.append([rng.choice(pool) for _ in range(rng.randrange(1, 60))])
    # Where HF's stream raises (test_a_stray_byte_token_does_not_end_the_stream), apart.
    sequences = [ids for ids in sequences if hf_streams(hf, ids)]
    assert len(sequences) > 150
    # (A run of byte tokens where a valid character meets a stray byte decodes otherwise
    # in two parts, so the window takes in the whole run: at most these 60 ids.)
    assert stream_window(tok, hf, sequences) <= 60
    stream = tok.decode_stream()   # (legacy: a "▁" in front after </s> as well)
    assert "".join(p for i in words if (p := stream.step(i))) == tok.decode(words) == (
        "naïve 家 👨‍👩‍👧 ok  two  spaces")


def hf_streams(hf, ids) -> bool:
    """Whether HF's DecodeStream takes `ids` without an error (skipping special tokens
    and not)."""
    from tokenizers.decoders import DecodeStream

    for skip in (True, False):
        stream = DecodeStream(skip_special_tokens=skip)
        try:
            for i in ids:
                stream.step(hf, i)
        except Exception:   # HF's DecodeStreamError::InvalidPrefix, as a plain Exception
            return False
    return True


def test_a_stray_byte_token_does_not_end_the_stream(tok, hf):
    """A byte token that turns the bytes of a character already emitted into invalid UTF-8
    (ByteFallback writes one U+FFFD per byte of such a run): HF's DecodeStream raises; ours
    keeps what it emitted and goes on from that token, as generation needs."""
    byte = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    ids = [byte[0xF0], byte[0x9F], byte[0x9A], byte[0x80], byte[0x80], tok.token_to_id("a"),
           *tok.encode(" ok", add_special_tokens=False)]
    assert not hf_streams(hf, ids)
    stream = tok.decode_stream()
    pieces = [stream.step(i) for i in ids]
    assert pieces[:5] == [None, None, None, "🚀", None]
    assert "".join(p for p in pieces if p) + stream.flush() == "🚀\ufffda  ok"
    assert tok.decode(ids) == "\ufffd" * 5 + "a  ok"


def test_encode_batch_is_encode_per_text_and_pickles(tok, real_case):
    texts = real_case[0][::97] + EDGE_CASES[:200]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    again = pickle.loads(pickle.dumps(tok))
    assert again.backend == tok.backend and again.encode_batch(texts) == tok.encode_batch(texts)


def test_vocab_accessors_match_hf(tok, hf):
    assert tok.vocab_size == hf.get_vocab_size()
    assert tok.pad_id is None
    for token in ["<s>", "<0xE6>", SPACE, f"{SPACE}the", "not-a-token"]:
        assert tok.token_to_id(token) == hf.token_to_id(token)


def test_built_from_arguments_as_from_the_file(trained, tok, backend):
    model = trained["model"]
    built = Tokenizer.sentencepiece_bpe(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], prefix_ids=[1],
        added_tokens=[_tokenizer_py.AddedToken(c, i, special=True)
                      for c, i in [("<unk>", 0), ("<s>", 1), ("</s>", 2)]],
        backend=backend)
    texts = ["Hello world, 日本 </s>", " two  spaces", "", *EDGE_CASES[:300]]
    assert built.encode_batch(texts) == tok.encode_batch(texts)
    assert built.decode(built.encode(texts[0])) == tok.decode(tok.encode(texts[0]))
    with pytest.raises(ValueError, match="Unknown prepend 'sometimes'"):
        Tokenizer.sentencepiece_bpe(vocab=model["vocab"], merges=[], prepend="sometimes",
                                    backend=backend)
    with pytest.raises(ValueError, match="decoder must be 'fallback' or 'metaspace'"):
        Tokenizer.sentencepiece_bpe(vocab=model["vocab"], merges=[], decoder="bytes",
                                    backend=backend)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(normalizer={"type": "Replace", "pattern": {"String": " "},
                                    "content": SPACE}),
     r"without a pre_tokenizer is read as SentencePiece-style .* does not implement"),
    (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "_",
                                       "prepend_scheme": "always", "split": True},
                        normalizer=None), r"replacement is '_'"),
    (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "prepend_scheme": "sometimes"},
                        normalizer=None), r"prepend_scheme is 'sometimes'"),
    (lambda d: d.update(pre_tokenizer={"type": "Metaspace"}),
     r"normalizer .* is not supported with a Metaspace pre_tokenizer"),
    (lambda d: d.update(decoder={"type": "ByteLevel"}), r"unsupported decoder.type 'ByteLevel'"),
    (lambda d: d["decoder"]["decoders"].pop(1), r"unsupported decoder .*Replace"),
    (lambda d: d["decoder"]["decoders"][3].update(content="x"), r"Strip.content is 'x'"),
    (lambda d: d["model"].update(dropout=0.1), r"model.dropout .* SentencePiece-style"),
    (lambda d: d["model"].update(unk_token="<nope>"), r"unk_token '<nope>' is not in"),
    (lambda d: d.update(post_processor={"type": "ByteLevel", "trim_offsets": True}),
     r"offset trimming\) with a SentencePiece-style BPE is not supported"),
])  # fmt: skip
def test_unsupported_files_are_refused(tmp_path, trained, backend, edit, message):
    path = write(tmp_path, trained, edit)
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_file(path, backend=backend)


@pytest.mark.skipif(given is None, reason="hypothesis is not installed")
def test_c_backend_matches_the_twin_and_hf_on_random_text(legacy_file):
    if "c" not in BACKENDS:
        pytest.skip("the C extension is not built")
    c, twin = (Tokenizer.from_file(legacy_file, backend=b) for b in ("c", "python"))
    hf = hf_tokenizer(legacy_file)
    pieces = st.sampled_from(ALPHABET) | st.text(max_size=4)

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(pieces, max_size=12).map("".join))
    def check(text):
        ids = c.encode(text)
        assert ids == twin.encode(text)
        if not any("\ud800" <= ch <= "\udfff" for ch in text):   # HF takes valid UTF-8 only
            assert ids == hf.encode(text).ids

    check()


def test_a_llama_checkpoint_with_this_tokenizer_exports_and_generates(trained, tmp_path):
    """The plumbing, on a small random Llama (the claim is not about quality): a checkpoint
    directory with a Llama-2-layout tokenizer.json exports, and its bundle encodes prompts as
    transformers does (BOS from add_bos_token, "▁" and byte tokens), on the C backend where
    built, and streams what it generates as it returns it whole."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import runtime
    from exporter import export

    checkpoint = tmp_path / "tiny-llama"
    checkpoint.mkdir()
    (checkpoint / "tokenizer.json").write_text(json.dumps(trained, ensure_ascii=False),
                                               encoding="utf-8")
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True}))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(trained["model"]["vocab"]), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True)).save_pretrained(checkpoint)
    bundle = export(str(checkpoint), target="arm-cpu", task="text-generation",
                    output=tmp_path / "bundle", log=lambda line: None)
    model = runtime.load(bundle)
    assert type(model.tokenizer._encoder).__name__ == "SentencePieceBPEEncoder"
    assert model.tokenizer.backend == next(iter(BACKENDS))   # "c" where it is built
    theirs = AutoTokenizer.from_pretrained(checkpoint)
    for prompt in ["The capital of France is", " two  spaces", "日本 🚀 </s> x"]:
        assert model.tokenizer.encode(prompt) == theirs(prompt)["input_ids"]
    whole = model.generate("The capital of France is", max_new_tokens=24)
    assert "".join(model.generate("The capital of France is", max_new_tokens=24,
                                  stream=True)) == whole
