"""Bundle archives and atomic directory replacement, shared by the exporter and the device.

A bundle archive is a plain tar of the bundle directory under its own name
(`minilm-arm-cpu/manifest.json`, ...): regular files only, sorted, owner 0, fixed modes,
every timestamp the manifest's creation time. `tar -xf` unpacks it anywhere;
`runtime.unpack` also verifies it before anything is replaced.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import tarfile
import time
from pathlib import Path


def replace_directory(new: Path, final: Path) -> None:
    """Move directory `new` (made by mkdtemp beside `final`) to `final`, replacing an old
    `final` with renames only. `new` gets the mode a plain mkdir gets under the umask."""
    # mkdtemp makes a private (0700) directory; a device's service account must read it.
    # (Read this way: setting the umask to read it is not thread-safe.)
    probe = new / ".mode"
    probe.mkdir()
    os.chmod(new, probe.stat().st_mode & 0o7777)
    probe.rmdir()
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_archive(bundle_dir: Path, archive: Path, *, name: str, created: str) -> None:
    """Write the files of `bundle_dir` to tar file `archive` under directory `name`, the
    same bytes for the same files: sorted, owner 0, modes 0644, mtime `created` (the
    manifest's "%Y-%m-%dT%H:%M:%SZ")."""
    mtime = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file())
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(f"{name}/{path.relative_to(bundle_dir).as_posix()}")
            info.size = path.stat().st_size
            info.mtime, info.mode, info.uid, info.gid = mtime, 0o644, 0, 0
            with open(path, "rb") as f:
                tar.addfile(info, f)


def archive_members(tar: tarfile.TarFile, archive: Path) -> tuple[str, list[tarfile.TarInfo]]:
    """(the bundle's directory name, its files) of an open bundle archive; ValueError for
    anything else in it: links, devices, absolute or escaping paths, several top levels."""
    tops, files = set(), []
    for member in tar.getmembers():
        parts = Path(member.name).parts
        if (not parts or Path(member.name).is_absolute() or ".." in parts
                or not (member.isfile() or member.isdir())):
            kind = "a link" if member.issym() or member.islnk() else (
                "an absolute or escaping path" if member.isfile() or member.isdir()
                else "not a regular file")
            raise ValueError(f"{archive}: member {member.name!r} is {kind}; a bundle archive "
                             f"holds only the bundle's files.")
        tops.add(parts[0])
        if member.isfile():
            if len(parts) < 2:
                raise ValueError(f"{archive}: file {member.name!r} is outside the bundle's "
                                 f"directory.")
            files.append(member)
    if len(tops) != 1 or not files:
        found = ", ".join(sorted(tops)) or "nothing"
        raise ValueError(f"{archive}: a bundle archive holds one directory (the bundle), "
                         f"found {found}.")
    return tops.pop(), files


def bundle_files(path: Path) -> set[str] | None:
    """What bundle directory `path` may hold: manifest.json and the files it lists (an
    empty set without a manifest.json; None when the manifest cannot be read)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return {"manifest.json"} | {entry["path"] for entry in manifest["files"]}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def holds_only(path: Path, allowed: set[str]) -> bool:
    """Whether every file and link under directory `path` is one of `allowed` (relative
    POSIX paths)."""
    found = (p for p in path.rglob("*") if p.is_symlink() or not p.is_dir())
    return all(p.relative_to(path).as_posix() in allowed for p in found)
