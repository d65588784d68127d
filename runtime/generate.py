"""Text generation with a decoder bundle: KV cache in place, sampling, streaming, perplexity.

The bundle's graph (exporter/decoder_graph.py) takes the new tokens and a KV buffer per layer
of fixed capacity, and writes the new keys and values into that same buffer. `Decoder` binds
each layer's `past_*` input and `present_*` output to one preallocated OrtValue (IO binding),
so a step copies nothing but the new token ids in and one row of logits out, and memory stays
flat however long the generation runs.

    >>> model = runtime.load("build/smollm2-arm-cpu")
    >>> model.generate("The capital of France is", max_new_tokens=8)
    ' Paris.\\n\\nThe answer is:'
"""

from __future__ import annotations

import mmap
import numbers
from collections.abc import Iterator, Sequence

import numpy as np

from ._checks import count


class ContextError(ValueError):
    """The prompt does not fit the bundle's context (KV cache capacity)."""


def gpu_device(session) -> int | None:
    """The CUDA device a session computes on, or None where its first provider is not CUDA."""
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return None
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    return int(options.get("device_id", 0))


class Decoder:
    """One sequence's KV cache and the session that fills it."""

    def __init__(self, session, *, context: int):
        import onnxruntime as ort

        self.session = session
        self.context = context
        inputs = {i.name: i for i in session.get_inputs()}
        self.layers = sum(1 for name in inputs if name.startswith("past_key."))
        _, kv_heads, _, head_dim = inputs["past_key.0"].shape
        shape = (1, int(kv_heads), context, int(head_dim))
        # float32 on CPU targets; float16 in graphs built for GPUs (jetson)
        dtype = np.float16 if inputs["past_key.0"].type == "tensor(float16)" else np.float32
        self.binding = session.io_binding()
        # GroupQueryAttention's CUDA kernel is float16/bfloat16 only: a float32 graph's
        # attention runs on the CPU even in a CUDA session, and reads a host cache in place
        gpu = gpu_device(session) if dtype == np.float16 else None
        if gpu is not None:
            # On CUDA the cache lives on the GPU. Bound as host memory, each step copied it in
            # and the new keys and values out through separate device buffers, so the graph's
            # in-place write (past and present one buffer) never happened: greedy text turned
            # to noise after the first token (seen on an H200; perplexity, one call per
            # window from an empty cache, was unaffected).
            zeros = np.zeros(shape, dtype)
            self._arrays = []
            self._cache = [ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", gpu)
                           for _ in range(2 * self.layers)]
            self._bytes = 2 * self.layers * zeros.nbytes
        else:
            # One anonymous mapping for the whole cache, unmapped when the Decoder goes: as
            # numpy arrays from malloc, the caches of concurrent generations stayed in the
            # process's heap after they ended (glibc keeps freed blocks of this size; +500 MB
            # for 6).
            size = 2 * self.layers * int(np.prod(shape)) * np.dtype(dtype).itemsize
            whole = np.frombuffer(mmap.mmap(-1, size), dtype).reshape(2 * self.layers, *shape)
            # filled now, not lazily zeroed: every page of the cache is resident from the
            # start, so memory is known at load time and does not creep up as the text grows
            whole.fill(0.0)
            self._arrays = list(whole)   # the OrtValues borrow this memory
            self._cache = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays]
            self._bytes = size
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                buffer = self._cache[2 * i + j]
                self.binding.bind_ortvalue_input(f"past_{kind}.{i}", buffer)
                self.binding.bind_ortvalue_output(f"present_{kind}.{i}", buffer)
        self.binding.bind_output("logits")   # bound last: the last of get_outputs()
        self.length = 0   # tokens in the cache

    @property
    def cache_bytes(self) -> int:
        return self._bytes

    def reset(self) -> None:
        """Forget the sequence (the buffers are reused; stale entries are never read)."""
        self.length = 0

    def forward(self, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the sequence; logits (positions, vocab) for the last position, or
        for every new position with all_logits."""
        n = len(ids)
        if n == 0:
            raise ValueError("forward() needs at least one token.")
        if self.length + n > self.context:
            raise ContextError(f"{self.length + n} tokens do not fit the bundle's context of "
                               f"{self.context} tokens.")
        b = self.binding
        b.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        b.bind_cpu_input("seqlens_k", np.array([self.length + n - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(self.length + n, np.int32))
        b.bind_cpu_input("num_logits", np.array([n if all_logits else 1], np.int64))
        b.bind_output("logits")   # rebound each step: its shape depends on num_logits
        self.session.run_with_iobinding(b)
        self.length += n
        return b.get_outputs()[-1].numpy()[0]


def sample(logits: np.ndarray, *, temperature: float, top_k: int, top_p: float,
           rng: np.random.Generator) -> int:
    """Next token id from one row of logits: greedy when temperature is 0."""
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64)
    with np.errstate(over="ignore"):   # a tiny temperature sends all but the best to -inf
        scaled = (logits - logits.max()) / temperature   # <= 0, so never +inf or NaN
    if 0 < top_k < scaled.size:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled[scaled < kth] = -np.inf
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p   # smallest set reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def check_sampling(*, max_new_tokens, temperature, top_k, top_p, seed) -> dict:
    """generate()'s sampling options, checked; numpy numbers become Python ones."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}.")
    try:
        finite = 0 <= float(temperature) < float("inf")   # nan too
    except OverflowError:   # an int past float's range: 10**400
        finite = False
    if not finite:
        shown = repr(temperature)
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got "
                         f"{shown if len(shown) < 40 else shown[:30] + '...'}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    return {"max_new_tokens": count(max_new_tokens, "max_new_tokens", least=0),
            "temperature": float(temperature), "top_p": float(top_p),
            "top_k": count(top_k, "top_k (0: off)", least=0),
            "seed": None if seed is None else count(seed, "seed", least=0)}


def stop_strings(stop) -> list[str]:
    """generate()'s `stop`: None, a str or a list of str; empty strings stop nothing."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__}.")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise TypeError(f"stop must be a str or a list of str; item {i} is "
                            f"{type(s).__name__}.")
    return [s for s in stop if s]


def generate_tokens(decoder: Decoder, prompt: list[int], *, max_new_tokens: int,
                    eos: set[int], temperature: float, top_k: int, top_p: float,
                    seed: int | None) -> Iterator[int]:
    """Token ids after `prompt` until eos, max_new_tokens or a full cache (eos not yielded)."""
    if not prompt:
        raise ValueError("The prompt is empty: give at least one token of text.")
    if len(prompt) > decoder.context:   # a full cache still gives the next token
        raise ContextError(f"The prompt is {len(prompt)} tokens; the bundle's context holds "
                           f"{decoder.context} (the prompt and every generated token but the "
                           f"last). Shorten the prompt.")
    if max_new_tokens == 0:
        return
    rng = np.random.default_rng(seed)
    decoder.reset()
    logits = decoder.forward(prompt)[-1]
    for produced in range(max_new_tokens):
        token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
        if token in eos:
            return
        yield token
        if produced + 1 == max_new_tokens or decoder.length >= decoder.context:
            return
        logits = decoder.forward([token])[-1]


def stream_text(tokens: Iterator[int], step, stop: Sequence[str], flush=None) -> Iterator[str]:
    """Text pieces for a token stream. `step(token)` returns the text a token completes, or
    None while a character is still incomplete (byte-level tokens can end inside a UTF-8
    sequence): `Tokenizer.decode_stream().step`. Text that could be the start of a stop
    string is held back until it is known not to be one; a stop string ends the stream and
    is not part of it. `flush()`, called once the tokens end, returns what `step` still
    holds (`DecodeStream.flush`), so the text is the whole decode of the tokens."""
    def pieces():
        for token in tokens:
            yield step(token)
        if flush is not None:
            yield flush()

    def held(text: str) -> int:
        """The length of the longest end of `text` that a stop string starts with (and is
        not whole): only that waits, not the longest stop string's length in any text (a
        500-character stop string held back every piece to the end)."""
        longest = 0
        for s in stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    text, emitted = "", 0
    for piece in pieces():
        if not piece:
            continue
        text += piece
        found = [at for s in stop if (at := text.find(s, max(emitted - len(s) + 1, 0))) >= 0]
        if found:   # the earliest stop string ends the text, whichever is listed first
            at = min(found)
            if at > emitted:
                yield text[emitted:at]
            return
        safe = len(text) - held(text)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if len(text) > emitted:
        yield text[emitted:]


def negative_log_likelihood(logits: np.ndarray, ids: Sequence[int], *,
                            rows: int = 64) -> float:
    """Summed -log p(ids[i + 1] | ids[:i + 1]) from the logits (positions, vocab) of ids,
    in float64, `rows` positions at a time (a whole window at once took 4x the logits' own
    memory: 2 GB for SmolLM2 at 1,024 tokens)."""
    total = 0.0
    for start in range(0, len(ids) - 1, rows):
        stop = min(start + rows, len(ids) - 1)
        block = np.asarray(logits[start:stop], dtype=np.float64)
        top = block.max(axis=1, keepdims=True)
        block -= top
        np.exp(block, out=block)
        log_z = top[:, 0] + np.log(block.sum(axis=1))
        chosen = np.asarray(logits[np.arange(start, stop), list(ids[start + 1:stop + 1])],
                            dtype=np.float64)
        total += float((log_z - chosen).sum())
    return total


def perplexity(decoder: Decoder, ids: list[int], window: int, *, chunk: int = 128) -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows of `window` tokens,
    each starting from an empty cache (the first token of a window is context only). A
    window goes through the cache `chunk` tokens at a time: the same logits as all at once
    (attention reads the cache), with a chunk's rows of logits in memory instead of the
    window's (200 MB for SmolLM2 at 1,024 tokens)."""
    window = count(window, "window", least=2)
    window = min(window, decoder.context)
    total, scored = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        part = ids[start:start + window]
        if len(part) < 2:
            break
        decoder.reset()
        for at in range(0, len(part) - 1, chunk):
            piece, targets = part[at:at + chunk], part[at + 1:at + chunk + 1]
            logits = decoder.forward(piece, all_logits=True)
            total += negative_log_likelihood(logits, [piece[0], *targets])
        scored += len(part) - 1
    if not scored:
        raise ValueError("perplexity() needs a text of at least 2 tokens.")
    return float(np.exp(total / scored))


def render_chat(fmt: dict, messages: Sequence[dict]) -> str:
    """A conversation as the model's chat template writes it (the exporter reduced the
    template to per-role patterns and checked them against Jinja)."""
    if not isinstance(messages, (str, dict, bytes, bytearray)):
        try:   # an iterator was never empty to `not messages`: it rendered no message
            messages = list(messages)
        except TypeError:
            pass
    if not isinstance(messages, list) or not messages:
        raise TypeError("chat() takes a non-empty list of {'role': ..., 'content': ...} dicts.")
    roles, other = fmt["roles"], fmt.get("any_role")
    text = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                (m["role"] not in roles and (other is None or not m["role"])) or \
                not isinstance(m.get("content"), str):
            named = f"one of {sorted(roles)}" + (" or another name" if other else "")
            raise ValueError(f"message {i} must be {{'role': {named}, 'content': str}}, "
                             f"got {m!r}.")
        role = m["role"]
        if role in roles:
            pattern, name = roles[role], None
        else:   # a role the template writes by its name (a tool's result)
            pattern, name = other, role
        if i == 0 and role != "system":
            text += fmt["default_system"]
        elif i == 0:   # where the template writes a first system message its own way
            pattern = fmt.get("first_system", pattern)
        content = m["content"].strip() if fmt.get("trim_content") else m["content"]
        before, after = pattern.split("{content}")   # neither text is read as a pattern
        if name is not None:
            before, after = before.replace("{role}", name), after.replace("{role}", name)
        text += before + content + after
    return text + fmt["generation_prompt"]
