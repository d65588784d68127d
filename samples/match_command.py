"""Device application: match what the user said to the closest known device command.

Uses only `runtime` (numpy + onnxruntime): embed the known commands once at start-up, then
embed each utterance and pick the command with the highest cosine similarity. Below the
threshold, or when two commands score within the margin of each other ("lock" and "unlock"
the front door differ by one token), it does nothing and says so: a car or a home should not
act on a guess.

    python samples/match_command.py build/minilm-arm-cpu "could you switch the kitchen light on"
    echo "lock up the front door" | python samples/match_command.py build/minilm-arm-cpu -
    python samples/match_command.py build/minilm-arm-cpu --key release.pub   # signed only
"""

from __future__ import annotations

import argparse
import io
import signal
import sys
import time
from collections.abc import Iterator

import numpy as np

import runtime

# Device command id -> the canonical phrase it is matched against.
COMMANDS: dict[str, str] = {
    "light.kitchen.on": "turn on the kitchen lights",
    "light.kitchen.off": "turn off the kitchen lights",
    "light.bedroom.dim": "dim the bedroom lights",
    "lock.front_door.lock": "lock the front door",
    "lock.front_door.unlock": "unlock the front door",
    "climate.set_warmer": "make it warmer in here",
    "climate.set_cooler": "make it cooler in here",
    "cover.garage.open": "open the garage door",
    "cover.garage.close": "close the garage door",
    "media.play": "play some music",
    "media.pause": "pause the music",
    "media.volume_up": "turn the volume up",
    "timer.start": "set a timer for ten minutes",
    "vacuum.start": "start vacuuming the house",
    "weather.today": "what is the weather like today",
}

DEMO_UTTERANCES = (
    "could you switch the kitchen light on",
    "it's too cold in here, warm it up",
    "shut the garage",
    "make sure the front door is locked",
    "what's the capital of france",
)


def batches(arguments: list[str]) -> Iterator[list[str]]:
    """The utterances to act on, in turn: the arguments as they come, and for each '-' stdin's
    lines one at a time, as each arrives (a device's speech front end writes a line per
    request and waits for the answer). Stdin is read as UTF-8; a bad byte becomes U+FFFD
    rather than stopping the device's loop."""
    given: list[str] = []
    for argument in arguments:
        if argument != "-":
            given.append(argument)
            continue
        if given:
            yield given
            given = []
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
        for line in stdin:
            if line.strip():
                yield [line.strip()]
        stdin.detach()   # not closed with the wrapper: another '-' reads on (to its end)
    if given:
        yield given


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, so that dot products are cosines (a model without a
    Normalize module, e.g. paraphrase-MiniLM-L6-v2, embeds unnormalized)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle directory written by python -m exporter")
    parser.add_argument("utterances", nargs="*",
                        help="what the user said; '-' reads one per line from stdin; "
                             "none runs a short demo")
    parser.add_argument("--threshold", type=float, default=0.55,
                        help="minimum cosine similarity to act (default 0.55)")
    parser.add_argument("--margin", type=float, default=0.03,
                        help="minimum lead over the runner-up to act (default 0.03)")
    parser.add_argument("--key", action="append", metavar="KEY.pub",
                        help="run the bundle only if this public key signed it (repeatable: "
                             "any of them); default: the keys in EDGE_TRUSTED_KEYS, if set")
    args = parser.parse_intermixed_args(argv)
    for name in ("threshold", "margin"):
        if not 0 <= getattr(args, name) <= 1:   # cosine similarities of unit vectors
            parser.error(f"--{name} must be from 0 to 1, got {getattr(args, name)}")
    if "-" in args.utterances and sys.stdin is None:   # started with `<&-`, or by pythonw
        parser.error("'-' reads utterances from stdin, and this process has none: pipe them "
                     "in, or give them as arguments")

    try:
        model = runtime.load(args.bundle, spinning=False, signed_by=args.key)
    except (FileNotFoundError, ValueError) as e:   # BundleError; a --key that is no key
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model.task != "feature-extraction":
        print(f"error: {args.bundle} is a {model.task} bundle; this sample matches sentence "
              f"embeddings (export one with: python -m exporter --target arm-cpu)",
              file=sys.stderr)
        return 2
    ids = list(COMMANDS)
    known = unit(model.embed([COMMANDS[i] for i in ids]))    # (commands, dim)
    said, elapsed_ms = 0, 0.0
    for utterances in batches(args.utterances) if args.utterances else [list(DEMO_UTTERANCES)]:
        started = time.perf_counter()
        heard = unit(model.embed(utterances))                # (utterances, dim)
        elapsed_ms += (time.perf_counter() - started) * 1e3
        said += len(utterances)
        scores = heard @ known.T                             # cosine similarities
        for text, row in zip(utterances, scores, strict=True):
            second, best = (int(i) for i in row.argsort()[-2:])
            if row[best] >= args.threshold and row[best] - row[second] < args.margin:
                print(f"{text!r} -> no action, ambiguous: {ids[best]} {row[best]:.2f} vs "
                      f"{ids[second]} {row[second]:.2f}")
            elif row[best] >= args.threshold:
                print(f"{text!r} -> {ids[best]} (similarity {row[best]:.2f})")
            else:
                print(f"{text!r} -> no action: closest is {ids[best]} at {row[best]:.2f}, "
                      f"below {args.threshold}")
        sys.stdout.flush()   # the answer to this line now, not when stdin ends
    if said:   # "-" and an empty stdin: nothing was said, nothing acted on or timed
        print(f"[{said} utterances embedded in {elapsed_ms:.1f} ms, "
              f"tokenizer backend: {runtime.Tokenizer.backend}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):   # piped into `head`: end quietly once it has read enough,
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as Unix filters do (no traceback)
    # Ctrl-C at the prompt ends it as it ends a Unix filter: by the signal, no traceback
    # (nothing here writes files, so there is nothing to finish first)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
