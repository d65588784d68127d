"""Unigram files (XLM-R, multilingual-e5, paraphrase-multilingual-MiniLM, T5) in
runtime.tokenizer against Hugging Face `tokenizers`, on every backend (the C encoder runs
the layouts transformers writes; the others go to the Python twin, said below).

No such tokenizer ships offline (they come from the hub), so the reference is made here as
those files are made (`exporter.data.xlmr_layout_tokenizer`): SentencePiece trains a Unigram
model with its nmt_nfkc normalization on English prose and the ~65 languages of
home-assistant-intents, and transformers converts it as it does XLM-R's: the normalizer
Sequence[Precompiled(charsmap), Strip(right), Replace(" {2,}", "▁")], Metaspace, "<s> $A
</s>", <mask> lstrip and normalized. Variants of the file cover the older XLM-R layout
(Precompiled alone, WhitespaceSplit before Metaspace, RobertaProcessing), each prepend
scheme, no split, byte fallback and no normalizer. The texts are English prose (conftest's
`prose`), every string of home-assistant-intents, and random text from an adversarial
alphabet: the charsmap's rules (NFKC, ligatures, fullwidth forms, controls removed),
grapheme clusters (combining marks, CRLF, Hangul jamo, emoji sequences), which the
Precompiled normalizer walks, and added tokens.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")

from _tokenizer_files import hf_tokenizer, write  # noqa: E402

from exporter.data import xlmr_layout_tokenizer  # noqa: E402
from runtime import _tokenizer_py  # noqa: E402
from runtime.tokenizer import BACKENDS, Tokenizer  # noqa: E402

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the property test is skipped below
    given = None

SPACE = "\u2581"
_rng = random.Random(0)
ALPHABET = [
    "a", "b", "the", " ", "  ", "   ", SPACE, "<s>", "</s>", "<unk>", "<mask>", " <mask>",
    "é", "e\u0301", "a\u0308\u0301", "\r\n", "\r", "\n", "\t", "\u00a0", "\u3000", "ﬁ", "①",
    "㍻", "Ａｂ", "¼", "…", "Ⅻ", "\u212b", "\u2126", "İ", "ß", "\u200d", "\u200c", "\u200b",
    "\ufeff", "\x00", "\x01", "\x7f", "\u0085", "\u2028", "👍🏽", "👨\u200d👩", "🇦🇨",
    "#\ufe0f\u20e3",
    "\u1100\u1161\u11a8", "가", "각\u0301", "\u0600", "क\u094d\u093f", "\u0e01\u0e33", "日本",
    "\U0001D165", "©\u200d®", "\ufffd", "Home", "Assistant",
]
EDGE_CASES = [
    "", " ", "   ", "\t", "\n", SPACE, SPACE * 3, " leading", "trailing  ", "two  spaces",
    "<s>", "a<s>b", "</s> x", "<mask>", "x <mask> y", "x  <mask>", "\x01start", "¼\x01x",
    "e\u0301\u0301", "\r\n\r\n", "한국어 텍스트", "日本語のテキスト", "🚀👩‍👩‍👧🇩🇪", "x" * 3000,
    "naïve café", "\u202eRTL\u202c", "ﬁnal ﬂow", "Ｆｕｌｌｗｉｄｔｈ", "▁▁▁" * 50,
    # a mark after a char the charsmap rewrites (one cluster, looked up whole, or not): a
    # range of the class tables cut where a line wrapped, marks new in Unicode 17 (HF: 16)
    "\u00a0\u0ccb", "µ\u0ccc", "ﬁ\u05c8", "ﬁ\u0b53", "①\u1acf",
    *("".join(_rng.choice(ALPHABET) for _ in range(_rng.randrange(1, 14))) for _ in range(2000)),
]


@pytest.fixture(scope="session")
def trained_folder(tmp_path_factory) -> Path:
    """What transformers saves for the trained XLM-R-layout tokenizer (tokenizer.json,
    tokenizer_config.json, the SentencePiece model...)."""
    return xlmr_layout_tokenizer(tmp_path_factory.mktemp("xlmr-layout")).parent


@pytest.fixture(scope="session")
def trained(trained_folder) -> dict:
    """The trained XLM-R-layout tokenizer.json, as a dict."""
    return json.loads((trained_folder / "tokenizer.json").read_text(encoding="utf-8"))


def normalizer_steps(data) -> list[dict]:
    normalizer = data["normalizer"]
    return normalizer["normalizers"] if normalizer["type"] == "Sequence" else [normalizer]


def older_xlmr(data):
    """As the hub's xlm-roberta-base and paraphrase-multilingual-MiniLM-L12-v2 files were
    written: Precompiled alone, WhitespaceSplit then Metaspace(add_prefix_space),
    RobertaProcessing (which trims offsets)."""
    data["normalizer"] = normalizer_steps(data)[0]
    metaspace = {"type": "Metaspace", "replacement": SPACE, "add_prefix_space": True}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, metaspace]}
    data["decoder"] = metaspace
    data["post_processor"] = {"type": "RobertaProcessing", "sep": ["</s>", 2],
                              "cls": ["<s>", 0], "trim_offsets": True, "add_prefix_space": True}


def scheme(name: str, split: bool = True):
    def edit(data):
        for section in ("pre_tokenizer", "decoder"):
            data[section] |= {"prepend_scheme": name, "split": split}
    edit.__name__ = f"prepend_{name}{'' if split else '_no_split'}"
    return edit


def byte_fallback(data):
    """byte_fallback, with the 256 <0xNN> pieces at the end of the vocab (lowest score)."""
    model = data["model"]
    model["byte_fallback"] = True
    low = min(score for _, score in model["vocab"]) - 1
    model["vocab"] += [[f"<0x{b:02X}>", low] for b in range(256)]
    mask = next(t for t in data["added_tokens"] if t["content"] == "<mask>")
    mask["id"] = len(model["vocab"])


def no_normalizer(data):
    data["normalizer"] = None


def t5_template(data):
    """T5's "$A </s>", and the plain added tokens T5 files list."""
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "</s>", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "</s>", "type_id": 1}}],
        "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    data["added_tokens"].append({"id": len(data["model"]["vocab"]) + 1,
                                 "content": "Home Assistant", "single_word": False,
                                 "lstrip": False, "rstrip": True, "normalized": True,
                                 "special": False})


VARIANTS = [older_xlmr, scheme("first"), scheme("never"), scheme("always", split=False),
            byte_fallback, no_normalizer, t5_template]


@pytest.fixture(scope="module")
def xlmr_file(tmp_path_factory, trained) -> Path:
    return write(tmp_path_factory.mktemp("xlmr"), trained)


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tok(xlmr_file, backend) -> Tokenizer:
    return Tokenizer.from_file(xlmr_file, backend=backend)


@pytest.fixture(scope="module")
def hf(xlmr_file):
    return hf_tokenizer(xlmr_file)


def valid(text: str) -> bool:
    """HF takes valid UTF-8 only (no lone surrogates)."""
    return not any("\ud800" <= ch <= "\udfff" for ch in text)


def test_real_text_matches_hf(tok, hf, prose, real_texts):
    texts = prose[::3] + real_texts[::2]
    assert tok.encode_batch(texts) == [e.ids for e in hf.encode_batch(texts)]


def test_edge_cases_and_offsets_match_hf(tok, hf):
    """Ids and offsets: the charsmap's rules and grapheme clusters (a cluster under 6
    bytes is looked up whole: "e" + U+0301 is "é"), characters it removes (whose place
    the next ones take, as HF aligns them), "▁" in front, added tokens."""
    for text in EDGE_CASES:
        ours, theirs = tok.encode_with_offsets(text), hf.encode(text)
        assert (ours.ids, ours.offsets) == (theirs.ids, theirs.offsets), text


def test_the_xlmr_layout(tok, hf):
    """What the file says, read as HF reads it: <s> and </s> around, NFKC and friends from
    the charsmap, spaces squeezed, <mask> taking the space before it, <pad> to pad with."""
    assert tok.pad_id == tok.token_to_id("<pad>") == 1
    ids = tok.encode("ﬁne  Ｔｅｘｔ <mask>")
    assert ids == hf.encode("ﬁne  Ｔｅｘｔ <mask>").ids
    assert ids[0] == 0 and ids[-1] == 2 and ids[-2] == tok.token_to_id("<mask>")
    assert tok.decode(ids) == hf.decode(ids) == "fine Text"
    assert tok.encode("") == [0, 2]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.__name__)
def variant(request, tmp_path_factory, trained):
    """The variant on the default backend (C, but for the "first" prepend scheme)."""
    path = write(tmp_path_factory.mktemp(request.param.__name__), trained, request.param)
    tok = Tokenizer.from_file(path)
    c_runs_it = request.param.__name__ != "prepend_first"
    assert tok.backend == (next(iter(BACKENDS)) if c_runs_it else "python")
    return tok, hf_tokenizer(path)


def test_file_variants_match_hf(variant, prose, real_texts):
    tok, hf = variant
    texts = prose[::20] + real_texts[::10] + EDGE_CASES
    assert tok.encode_batch(texts) == [e.ids for e in hf.encode_batch(texts)]
    for text in texts[-300:]:
        ours, theirs = tok.encode_with_offsets(text), hf.encode(text)
        assert (ours.ids, ours.offsets) == (theirs.ids, theirs.offsets), text
    sequences = [tok.encode(text) for text in texts[-300:]]
    for skip in (True, False):
        assert [tok.decode(ids, skip_special_tokens=skip) for ids in sequences] == [
            hf.decode(ids, skip_special_tokens=skip) for ids in sequences]


@pytest.mark.parametrize("max_length", [2, 3, 8, 64])
def test_truncation_matches_hf(xlmr_file, tok, real_texts, max_length):
    hf = hf_tokenizer(xlmr_file)
    hf.enable_truncation(max_length)
    texts = real_texts[::50]
    assert tok.encode_batch(texts, max_length=max_length) == [
        e.ids for e in hf.encode_batch(texts)]
    assert [tok.encode_with_offsets(t, max_length=max_length).offsets for t in texts[:200]] \
        == [hf.encode(t).offsets for t in texts[:200]]


def test_decode_and_decode_stream_match_hf(tok, hf, stream_window):
    rng = random.Random(2)
    size = hf.get_vocab_size()
    pool = list(range(size)) + [0, 1, 2, 3] * 50 + [size + 3]
    sequences = [[rng.choice(pool) for _ in range(rng.randrange(0, 25))] for _ in range(2000)]
    for skip in (True, False):
        assert [tok.decode(ids, skip_special_tokens=skip) for ids in sequences] == [
            hf.decode(ids, skip_special_tokens=skip) for ids in sequences]
    words = tok.encode("naïve 家 👨‍👩‍👧 ok</s> two  spaces", add_special_tokens=False)
    assert stream_window(tok, hf, [words] + sequences[:300]) <= 32


def test_encode_batch_pickle_and_accessors(tok, hf, real_texts):
    texts = real_texts[::200]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert tok.vocab_size == hf.get_vocab_size()
    assert all(tok.id_to_token(i) == hf.id_to_token(i) for i in range(tok.vocab_size))


def test_built_from_arguments_as_from_the_file(trained, tok, backend, real_texts):
    import base64

    model = trained["model"]
    charsmap = normalizer_steps(trained)[0]["precompiled_charsmap"]
    built = Tokenizer.unigram(
        pieces=[tuple(p) for p in model["vocab"]], unk_id=model["unk_id"],
        normalizers=[("precompiled", base64.b64decode(charsmap)), ("strip", False, True),
                     ("replace_regex", " {2,}", SPACE)],
        added_tokens=[_tokenizer_py.AddedToken("<s>", 0, True), _tokenizer_py.AddedToken(
            "</s>", 2, True)], prefix_ids=[0], suffix_ids=[2], backend=backend)
    assert built.backend == backend
    texts = real_texts[::100]
    assert built.encode_batch(texts) == tok.encode_batch(texts)
    assert pickle.loads(pickle.dumps(built)).encode(texts[0]) == tok.encode(texts[0])


def test_a_layout_the_c_encoder_does_not_run_goes_to_the_twin(tmp_path, trained):
    """The "first" prepend scheme needs where each normalized char came from, which only the
    twin keeps: asked for by name, C says so; left unset, the twin runs it."""
    path = write(tmp_path, trained, scheme("first"))
    if "c" in BACKENDS:
        with pytest.raises(ValueError, match="'c' tokenizer backend cannot run this Unigram "
                                             "tokenizer: the C Unigram encoder does not "
                                             "implement the prepend scheme \"first\""):
            Tokenizer.from_file(path, backend="c")
    tok, hf = Tokenizer.from_file(path), hf_tokenizer(path)
    assert tok.backend == "python"
    texts = EDGE_CASES[:300]
    assert tok.encode_batch(texts) == [e.ids for e in hf.encode_batch(texts)]


def test_offset_trimming_keeps_hfs_guard(tmp_path, trained, backend):
    """RobertaProcessing's trimming takes a token's trailing spaces off its end only where
    the end is at least that many (HF's guard), here where the normalizer writes spaces."""
    def edit(data):
        older_xlmr(data)
        data["normalizer"] = {"type": "Replace", "pattern": {"String": "Q"},
                              "content": "😀\t\t\t"}
    path = write(tmp_path, trained, edit)
    tok, hf = Tokenizer.from_file(path, backend=backend), hf_tokenizer(path)
    for text in ["Q", "aQ", "Q b", "xQQ"]:
        ours, theirs = tok.encode_with_offsets(text), hf.encode(text)
        assert (ours.ids, ours.offsets) == (theirs.ids, theirs.offsets), text


def _set(path: str, value):
    def edit(data):
        *parents, key = path.split(".")
        node = data
        for parent in parents:
            node = node[parent]
        node[key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("model.unk_id", None), "model.unk_id is null"),
    (_set("model.vocab", [["a", 0.0], ["a", -1.0]]), "lists the piece 'a' twice"),
    (_set("model.vocab", [["a"]]), r"model.vocab\[0\] is \['a'\]; expected a \(piece, score\)"),
    (_set("model.vocab", [["a", "x"]]), r"model.vocab\[0\] \('a'\) has score 'x'"),
    (_set("model.vocab", [["<unk>", 0.0], ["a", float("nan")]]), "expected a finite number"),
    (_set("normalizer", {"type": "NFKD"}), "normalizer.type 'NFKD'.*'Precompiled' or 'Strip'"),
    (_set("normalizer", {"type": "Precompiled", "precompiled_charsmap": "@@"}),
     "precompiled_charsmap is not base64"),
    (_set("normalizer", {"type": "Precompiled", "precompiled_charsmap": "AAAAAQ=="}),
     "precompiled_charsmap: a trie of 16777216 bytes does not fit"),
    (_set("normalizer", {"type": "Precompiled", "precompiled_charsmap": "AAAAAA=="}),
     "precompiled_charsmap has an empty trie"),
    (_set("normalizer", {"type": "Precompiled", "precompiled_charsmap": "BAAAAAAAAAD/"}),
     "replacement strings are not UTF-8"),
    (_set("normalizer", {"type": "Precompiled", "precompiled_charsmap": None}),
     "'normalizer.precompiled_charsmap' must be str"),
    (_set("normalizer", {"type": "Strip", "strip_right": True}),
     "missing field 'normalizer.strip_left'"),
    (_set("normalizer", {"type": "Replace", "pattern": {"Regex": "("}, "content": ""}),
     r"Replace.pattern.Regex '\(' is not supported"),
    (_set("normalizer", {"type": "Replace", "pattern": {"Regex": "^ +| +$"}, "content": ""}),
     r"Regex '\^ \+\| \+\$' is not supported; .* a run of one char"),
    (_set("model.unk_id", True), "'model.unk_id' must be int, got True"),
    (_set("pre_tokenizer", {"type": "Whitespace"}), "unsupported pre_tokenizer.*Unigram"),
    (_set("decoder", {"type": "WordPiece"}), "decoder.type 'WordPiece'.*'Metaspace'"),
])
def test_unsupported_files_are_refused(tmp_path, trained, edit, message):
    path = write(tmp_path, trained, edit)
    with pytest.raises(ValueError, match=message) as raised:
        Tokenizer.from_file(path)
    assert str(path) in str(raised.value)


def test_grapheme_clusters_match_the_regex_module():
    """UAX #29 clusters under 6 UTF-8 bytes, which the Precompiled normalizer looks up
    whole, against the `regex` module's \\X (which transformers installs), on random text
    from the alphabet above."""
    regex = pytest.importorskip("regex")
    rng = random.Random(4)
    for _ in range(3000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 10)))
        ends = _tokenizer_py.grapheme_ends(text)
        clusters = [text[a:b] for a, b in zip([0, *ends], ends, strict=False)]
        assert clusters == regex.findall(r"\X", text), text


@pytest.mark.skipif(given is None, reason="hypothesis is not installed")
def test_random_text_matches_hf_on_every_backend(xlmr_file):
    """C == the twin == HF, ids and offsets, on random text."""
    toks = [Tokenizer.from_file(xlmr_file, backend=name) for name in BACKENDS]
    hf = hf_tokenizer(xlmr_file)
    pieces = st.sampled_from(ALPHABET) | st.text(max_size=4)

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(pieces, max_size=12).map("".join))
    def check(text):
        ours = toks[0].encode_with_offsets(text)
        assert all(tok.encode(text) == ours.ids for tok in toks)
        if valid(text):
            theirs = hf.encode(text)
            assert (ours.ids, ours.offsets) == (theirs.ids, theirs.offsets)

    check()


def test_an_xlmr_checkpoint_with_this_tokenizer_exports_and_embeds(trained_folder, tmp_path):
    """The plumbing, on a small random XLM-R encoder (the claim is not about quality): a
    checkpoint directory with this tokenizer exports for arm-cpu, and its bundle encodes
    texts as transformers' AutoTokenizer does (<s> </s>, the charsmap, <mask>) and embeds."""
    import shutil

    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    import runtime
    from exporter import export

    checkpoint = tmp_path / "tiny-xlmr"
    shutil.copytree(trained_folder, checkpoint)
    vocab_size = len(json.loads((checkpoint / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    XLMRobertaModel(XLMRobertaConfig(
        vocab_size=vocab_size + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
        eos_token_id=2)).save_pretrained(checkpoint)
    bundle = export(str(checkpoint), target="arm-cpu", output=tmp_path / "bundle",
                    log=lambda line: None)
    model = runtime.load(bundle)
    assert type(model.tokenizer._encoder).__name__ == "UnigramEncoder"
    assert model.tokenizer.backend == next(iter(BACKENDS))   # "c" where it is built
    theirs = AutoTokenizer.from_pretrained(checkpoint)
    texts = ["turn on the kitchen lights", "Schalte das Licht  ein", "日本 🚀 </s> x <mask>",
             "ﬁnal Ｔｅｘｔ", ""]
    for text in texts:
        assert model.tokenizer.encode(text) == theirs(text)["input_ids"]
    vectors = model.embed(texts)
    assert vectors.shape == (len(texts), 64)


@pytest.mark.parametrize("arguments, error, message", [
    ({"normalizers": None}, TypeError, "normalizers must be a list of steps, got NoneType"),
    ({"normalizers": [("precompiled", "text")]}, ValueError,
     r"unknown normalizer step \('precompiled', 'text'\)"),
    ({"normalizers": [("strip", 1, 0)]}, ValueError, r"unknown normalizer step \('strip', 1"),
    ({"normalizers": [("replace_string", "a", 5)]}, ValueError, "unknown normalizer step"),
    ({"normalizers": [("replace_regex", "a+", "x")]}, ValueError,
     "a Replace regex is supported as a run of one char"),
    ({"pieces": []}, ValueError, "pieces is empty"),
    ({"unk_id": 7}, ValueError, r"unk_id 7 is not the id of a piece \(0 to 1\)"),
    ({"prepend": "legacy"}, ValueError, "Unknown prepend 'legacy'"),
])
def test_bad_arguments_are_refused_alike_on_every_backend(backend, arguments, error, message):
    given = {"pieces": [("<unk>", 0.0), ("▁a", -1.0)], "unk_id": 0} | arguments
    with pytest.raises(error, match=message):
        Tokenizer.unigram(**given, backend=backend)
