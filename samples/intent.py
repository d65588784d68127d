"""Device application: say what the user wants, or say that it is not sure.

Reads utterances (arguments, or one per line from stdin with '-') and prints the intent the
bundle's classifier picks with its confidence. Below the threshold it refuses to act: in a car
or a home, doing nothing beats doing the wrong thing. Uses only `runtime`.

    python samples/intent.py build/intent-model-arm-cpu "turn on the kitchen lights"
    python samples/intent.py build/intent-model-arm-cpu - < utterances.txt
"""

from __future__ import annotations

import argparse
import io
import signal
import sys
from collections.abc import Iterator

import runtime


def batches(arguments: list[str]) -> Iterator[list[str]]:
    """The utterances to act on, in turn: the arguments as they come, and for each '-' stdin's
    lines one at a time, as each arrives (a device's speech front end writes a line per
    request and waits for the answer). Stdin is read as UTF-8; a bad byte becomes U+FFFD
    rather than stopping the device's loop. (As in match_command.py:
    each sample stands alone, to be copied to a device by itself.)"""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="text-classification bundle written by the exporter")
    parser.add_argument("utterances", nargs="+", help="what the user said; '-' reads stdin")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="minimum confidence to act (default 0.5)")
    parser.add_argument("--key", action="append", metavar="KEY.pub",
                        help="run the bundle only if this public key signed it (repeatable: "
                             "any of them); default: the keys in EDGE_TRUSTED_KEYS, if set")
    args = parser.parse_args(argv)
    if not 0 <= args.threshold <= 1:   # a probability; above 1 nothing could ever act
        parser.error(f"--threshold must be from 0 to 1, got {args.threshold}")
    if "-" in args.utterances and sys.stdin is None:   # started with `<&-`, or by pythonw
        parser.error("'-' reads utterances from stdin, and this process has none: pipe them "
                     "in, or give them as arguments")

    try:
        model = runtime.load(args.bundle, spinning=False, signed_by=args.key)
        if model.task != "text-classification":
            raise ValueError(f"{args.bundle} is a {model.task} bundle, not an intent "
                             f"classifier (export one with --task text-classification).")
    except (FileNotFoundError, ValueError) as e:  # BundleError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    for utterances in batches(args.utterances):
        for text, ranked in zip(utterances, model.classify(utterances, top_k=2), strict=True):
            (intent, score), (runner_up, second) = ranked
            if score >= args.threshold:
                print(f"{text!r} -> {intent} ({score:.0%})")
            else:
                print(f"{text!r} -> not sure, no action ({intent} {score:.0%}, "
                      f"{runner_up} {second:.0%})")
        sys.stdout.flush()   # the answer to this line now, not when stdin ends
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):   # piped into `head`: end quietly once it has read enough,
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as Unix filters do (no traceback)
    # Ctrl-C at the prompt ends it as it ends a Unix filter: by the signal, no traceback
    # (nothing here writes files, so there is nothing to finish first)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
