"""Device-side commands for shell scripts and updaters:

    python -m runtime unpack ARCHIVE DIRECTORY   # install a bundle archive, verified
    python -m runtime verify BUNDLE              # check a bundle as runtime.load would

Each prints one line on success (unpack: the bundle's directory) and exits 0; a bundle that
fails its checks, a missing path, one it will not replace or may not write (no permission, a
read-only file system) exits 2 with the reason on stderr, and an I/O error (a full disk) exits 1.
"""

from __future__ import annotations

import argparse
import errno
import sys

from . import Bundle, BundleError, unpack
from .model import Model, _manifest_runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("unpack", help="install a bundle archive (.tar), verified")
    install.add_argument("archive", help="the .tar that python -m exporter --tar writes")
    install.add_argument("directory", help="where the bundle's directory goes")
    check = commands.add_parser("verify", help="check a bundle as runtime.load would")
    check.add_argument("bundle", help="a bundle directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "unpack":
            print(unpack(args.archive, args.directory))
        else:
            bundle = Bundle.open(args.bundle)
            # Everything load checks beyond the files (settings, stages, tokenizer, labels)
            # is checked by loading it: an updater switches to a bundle that verify passed.
            # The manifest's threads and providers too, though this loads on one CPU thread.
            _manifest_runtime(bundle)
            Model(bundle, threads=1, providers=["CPUExecutionProvider"])
            m = bundle.manifest
            size = sum(entry["bytes"] for entry in m["files"])
            print(f"{bundle.path}: {m.get('name')} ({m.get('task')}, target "
                  f"{m.get('target', {}).get('name')}), {len(m['files'])} files, "
                  f"{size / 1e6:.1f} MB, sha256 verified; format {m['format_version']}, "
                  f"opset {m['opset']}")
    except (BundleError, FileNotFoundError, FileExistsError, PermissionError,
            NotADirectoryError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a read-only file system, like no permission, is the path's
        print(f"error: {e}", file=sys.stderr)
        return 2 if e.errno == errno.EROFS else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
