"""Device-side commands for shell scripts and updaters:

    python -m runtime unpack ARCHIVE DIRECTORY   # install a bundle archive, verified
    python -m runtime verify BUNDLE              # check a bundle as runtime.load would

With `--key KEY.pub` (repeatable: any of them), each also requires the bundle to be signed
by that key (manifest.sig), as runtime.load(..., signed_by=...) does; without --key, by one
of the keys in EDGE_TRUSTED_KEYS where it is set. Each prints one line on success (unpack:
the bundle's directory) and exits 0; a bundle that fails its checks (an unsigned one, where
keys are given), a missing path or key, one it will not replace or may not write (no
permission, a read-only file system) exits 2 with the reason on stderr, and an I/O error (a
full disk) exits 1.
SIGTERM or SIGHUP stops an unpack with its work removed and the old bundle in place (exit
128 + N); a reader that closed the output early (`| head -c0`) does not undo a success.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys

from . import BundleError, load, unpack
from .bundle import signing_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("unpack", help="install a bundle archive (.tar), verified")
    install.add_argument("archive", help="the .tar that python -m exporter --tar writes")
    install.add_argument("directory", help="where the bundle's directory goes")
    check = commands.add_parser("verify", help="check a bundle as runtime.load would")
    check.add_argument("bundle", help="a bundle directory")
    for command in (install, check):
        command.add_argument("--key", action="append", metavar="KEY.pub",
                             help="a trusted public key (PEM): the bundle must be signed by "
                                  "it, or by another --key")
    args = parser.parse_args(argv)
    try:   # the environment's settings first (EDGE_Q4_ISA, EDGE_ORT_LOG), as a refusal
        from .model import kernel_library, ort_log_level

        kernel_library()
        ort_log_level()
        keys = signing_keys(args.key, policy=True)   # the trusted keys (None: no --key)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "unpack":
            _say(unpack(args.archive, args.directory, signed_by=keys))
        else:
            # Everything load checks beyond the files (settings, stages, tokenizer, labels)
            # is checked by loading it: an updater switches to a bundle that verify passed.
            # The manifest's threads and providers too, though this loads on one CPU thread.
            # As load does, it starts again where an unpack swapped the bundle meanwhile.
            model = load(args.bundle, threads=1, providers=["CPUExecutionProvider"],
                         signed_by=keys)
            model.close()
            bundle, m = model.bundle, model.manifest
            size = sum(entry["bytes"] for entry in m["files"])
            signed = f", signed by key {bundle.signer}" if bundle.signer else \
                _unchecked_signature(bundle.path)
            _say(f"{bundle.path}: {m.get('name')} ({m.get('task')}, target "
                 f"{m.get('target', {}).get('name')}), {len(m['files'])} files, "
                 f"{size / 1e6:.1f} MB, sha256 verified{signed}; format "
                 f"{m['format_version']}, opset {m['opset']}")
    except (BundleError, FileNotFoundError, FileExistsError, PermissionError,
            NotADirectoryError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a read-only file system, like no permission, is the path's
        print(f"error: {e}", file=sys.stderr)
        return 2 if e.errno == errno.EROFS else 1
    return 0


def _unchecked_signature(path) -> str:
    """What the verify line says of a manifest.sig that no --key checked."""
    from ._signature import SIGNATURE_FILE

    try:
        signer = json.loads((path / SIGNATURE_FILE).read_text(encoding="utf-8"))["key"]
    except FileNotFoundError:
        return ", unsigned"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        signer = "unreadable"
    return f", {SIGNATURE_FILE} (key {signer}) not checked: give --key"


def _say(line) -> None:
    """Print the success line; a reader gone meanwhile (a pipe closed) changes nothing done."""
    try:
        print(line, flush=True)
    except BrokenPipeError:   # and no second error when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


_stopped_by = 0   # the signal _stop took, if any


def _stop(signum, frame):
    global _stopped_by
    _stopped_by = signum
    raise SystemExit(128 + signum)   # unwinds through unpack's cleanup, as Ctrl-C does


def _run(argv: list[str] | None = None) -> int:
    """main(), whose status is 128 + N however a stop by signal N unwinds: onnxruntime's
    native module, stopped while it starts, turns the SystemExit into an ImportError
    (which gave exit 1 and a traceback, the status of a full disk)."""
    try:
        status = main(argv)
    except Exception:
        if _stopped_by:
            return 128 + _stopped_by
        raise
    return 128 + _stopped_by if _stopped_by else status


if __name__ == "__main__":
    # An updater's timeout or `systemctl stop` sends SIGTERM: by default it ends the process
    # on the spot and leaves the unpack's work directory (the bundle's size) behind.
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _stop)
    sys.exit(_run())
