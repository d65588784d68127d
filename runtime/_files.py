"""Bundle archives and atomic directory replacement, shared by the exporter and the device.

A bundle archive is a plain tar of the bundle directory under its own name
(`minilm-arm-cpu/manifest.json`, ...): regular files only, sorted, owner 0, fixed modes,
every timestamp the manifest's creation time. `tar -xf` unpacks it anywhere;
`runtime.unpack` also verifies it before anything is replaced.
"""

from __future__ import annotations

import calendar
import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath

from ._signature import SIGNATURE_FILE

try:
    import fcntl
except ImportError:   # not on Windows: the pid and the clock tell, as below
    fcntl = None

# Which work directories are in use is told by a lock, not by a pid and a clock: each one
# this process makes it holds locked (flock, released by the kernel when the process ends,
# SIGKILL included), so a run that finds it can lock it only once its maker is gone. A pid
# cannot tell: a process in another container sharing the directory has a pid of its own
# namespace, and a container's process is pid 7 on every start. Nor can the clock: a device
# without a real-time clock jumps years forward at its first NTP sync, and its live work
# directory then reads as older than the process that made it.
# (st_dev, st_ino) of each directory this process holds -> the open, locked descriptor.
_held: dict[tuple[int, int], int] = {}
# Taken to change `_held`: threads of one process sweep it, and a descriptor closed by one
# is reused by the next open of another.
_held_lock = threading.Lock()
# (st_dev, st_ino) of the directories this process named with its pid, where the filesystem
# has no locks (some FUSE and NFS mounts): one with its pid that it did not make is a
# leftover of an earlier run that had the same pid.
_made_here: set[tuple[int, int]] = set()


def _identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def _lock(path: Path) -> tuple[int | None, str]:
    """Open directory `path` and lock it without waiting: (descriptor, "locked"); (None,
    "held") where another open of it holds the lock (a live run, this process's included);
    (None, "gone") where it is not there; (None, "unsupported") where its filesystem (or
    the system) has no locks, or it cannot be opened."""
    if fcntl is None:
        return None, "unsupported"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None, "gone"
    except OSError:   # another user's private directory: its lock cannot be tried
        return None, "unsupported"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        return None, ("held" if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
                      else "unsupported")
    return fd, "locked"


def _release_removed() -> None:
    """Close the locks of directories this process held that are gone since (removed by its
    cleanup: a directory's link count is 0 once it is)."""
    with _held_lock:
        for key, fd in list(_held.items()):
            if os.fstat(fd).st_nlink == 0:
                del _held[key]
                os.close(fd)


def work_dir_beside(target: Path) -> Path:
    """A new private directory next to `target` (the same filesystem, so the final rename is
    atomic), named `.<target>.<pid>.<random>` and held locked while this process lives: a
    later run removes it (`remove_leftovers`) only once the lock is free, its maker gone."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _release_removed()
    for _ in range(100):
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
        fd, state = _lock(work)
        if state == "unsupported":
            _made_here.add(_identity(work))
            return work
        if fd is not None:
            info = os.fstat(fd)
            try:
                here = _identity(work) == (info.st_dev, info.st_ino)
            except FileNotFoundError:
                here = False
            if here:
                with _held_lock:
                    _held[info.st_dev, info.st_ino] = fd
                return work
            os.close(fd)
        # Another run's remove_leftovers found it before the lock was taken, empty and
        # free, and removed it (or is removing it): make another.
    raise OSError(f"Cannot make a work directory beside {str(target)!r}: other runs removed "
                  f"each one made (100 tries).")


def refused_why(error: OSError, directory: Path) -> str | None:
    """Why writing into `directory` failed with `error`, in words naming the directory that
    refused (the nearest one that exists), where it is no permission, a read-only file
    system, or a directory that takes no new files (/proc): the directory chosen, not the
    machine failing. None for any other error."""
    if error.errno == errno.ENOENT and directory.is_dir():   # mkdir "no such file" in a
        return f"{str(directory)!r} takes no new files (a virtual file system such as /proc?)"
    if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
        return None
    where = directory
    while not where.exists():
        where = where.parent
    return (f"no permission to create files in {str(where)!r}"
            if isinstance(error, PermissionError) else
            f"{str(where)!r} is on a read-only file system")


# What a write of `target` adds to its name beside it, at most: `.<name>.rejected.old-<pid>.`
# and mkdtemp's 8 characters (pids up to 7 digits).
SIBLING_NAME_EXTRA = len(".") + len(".rejected") + len(".old-") + 7 + len(".") + 8


def check_name_room(target: Path, what: str = "Output") -> None:
    """ValueError unless the names written beside `target` (work directories, the replaced
    copy, `<name>.rejected`) fit the file system's name limit: a 240-character name failed
    after the export's work with "[Errno 36] File name too long" and another name."""
    parent = next((p for p in (target.parent, *target.parent.parents) if p.is_dir()), Path("."))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(target.name))
    if size + SIBLING_NAME_EXTRA > limit:
        raise ValueError(f"{what} name {target.name[:40]!r}... is {size} bytes long; this file "
                         f"system takes names of up to {limit}, and the names written beside "
                         f"it (work directories, {target.name[:10]}....rejected) add up to "
                         f"{SIBLING_NAME_EXTRA}: choose a name of at most "
                         f"{limit - SIBLING_NAME_EXTRA} bytes.")


def remove_leftovers(target: Path) -> int:
    """Remove what runs writing `target` left beside it when they were killed before their
    cleanup could run (SIGKILL, power loss): work directories that no live run holds, and
    replaced copies. Returns the bytes freed."""
    # Exactly the names work_dir_beside and replace_directory make (mkdtemp adds 8 chars of
    # [a-z0-9_]), and replace_directory's older `.old-<pid>`; nothing looser: the work
    # directory `.out.2024.<pid>.<random>` of a live run writing `out.2024` is not `out`'s.
    own = re.compile(rf"\.{re.escape(target.name)}\."
                     rf"(?:(\d+)\.[a-z0-9_]{{8}}|old-(\d+)(?:\.[a-z0-9_]{{8}})?)")
    _release_removed()   # (a long-lived process cleaning up often holds none it removed)
    freed = 0
    parent = target.parent if target.parent.is_dir() else None
    for path in parent.iterdir() if parent else ():
        match = own.fullmatch(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        try:   # this process's own (tried first: where flock is emulated by POSIX locks,
            # as on NFS, a process gets its own lock again, and its close frees every one)
            if _identity(path) in _held:
                continue
        except OSError:   # removed meanwhile
            continue
        fd, state = _lock(path)
        if state in ("held", "gone"):
            continue   # a live run's (this one's included), or removed meanwhile
        if state == "unsupported" and _in_use(path, int(match.group(1) or match.group(2))):
            continue
        try:   # holding its lock while removing it: a run taking it meanwhile makes another
            freed += sum(f.stat().st_size for f in path.rglob("*")
                         if f.is_file() and not f.is_symlink())
            shutil.rmtree(path, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
    return freed


def _in_use(path: Path, pid: int) -> bool:
    """Whether directory `path`, named with `pid` on a filesystem without locks, may be a live
    run's: this process's own, or made by process `pid` since it started (by the clock)."""
    if pid == os.getpid():
        try:
            return _identity(path) in _made_here
        except OSError:   # removed meanwhile
            return True
    return _alive(pid) and not _older_than(path, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def _older_than(path: Path, pid: int) -> bool:
    """Whether directory `path` was last changed before the live process `pid` started, so
    that an earlier process with the same pid made it. False where that cannot be told (no
    /proc): kept."""
    started = _started(pid)
    try:
        info = path.stat()
    except OSError:
        return False
    # The ctime too: copying an old mtime onto a directory (copystat) changes its ctime.
    # btime is whole seconds and moves with clock adjustments: a margin.
    return started is not None and max(info.st_mtime, info.st_ctime) < started - 2


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None without it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:   # field 22: start, clock ticks after boot
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def replace_directory(new: Path, final: Path) -> None:
    """Move directory `new` (made by mkdtemp beside `final`) to `final`, replacing an old
    `final` with renames only. `new`, its directories and its files get the modes a plain
    mkdir and open get under the umask."""
    # mkdtemp makes a private (0700) directory; a device's service account must read it.
    # (Read this way: setting the umask to read it is not thread-safe.)
    probe = new / ".mode"
    probe.mkdir()
    directory_mode = probe.stat().st_mode & 0o7777
    probe.rmdir()
    probe.touch()
    file_mode = probe.stat().st_mode & 0o7777
    probe.unlink()
    # ... and so must its files: a writer may make them private (safetensors: 0600)
    for path in new.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, directory_mode if path.is_dir() else file_mode)
    os.chmod(new, directory_mode)
    work = _identity(new)
    _rename_over(new, final)
    # Held until renamed (a run finding it under its work name would remove it), then not:
    # it is the output now.
    with _held_lock:
        held = _held.pop(work, None)
    if held is not None:
        os.close(held)


def _rename_over(new: Path, final: Path) -> None:
    """Rename directory `new` to `final`, replacing an old `final`: exchanged in one step
    where the system can, else renamed aside first. Where another run puts its `final` in
    place meanwhile (two first installs at once), this one replaces it: the last wins."""
    for _ in range(10):
        if final.exists() and not final.is_symlink() and final.is_dir() \
                and _exchange(new, final):
            shutil.rmtree(new, ignore_errors=True)   # now the old one
            return
        old = None
        if final.exists():
            # A fresh name: a leftover of a killed run may hold `.old-<pid>` of a pid reused
            # since (a device reboots). rename() replaces the empty directory mkdtemp made.
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}.",
                                        dir=final.parent))
            try:
                os.rename(final, old)
            except FileNotFoundError:   # another run renamed it aside meanwhile
                os.rmdir(old)
                continue
            except OSError:   # a mount point (EBUSY) cannot move: no empty `old` left
                with contextlib.suppress(OSError):
                    os.rmdir(old)
                raise
        try:
            os.rename(new, final)   # (between the two renames, `final` is missing a moment)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                if old is not None:   # the old one back in place, as it was
                    with contextlib.suppress(OSError):
                        os.rename(old, final)
                raise
            # another run's `final` arrived meanwhile: replace it in turn
        else:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    raise FileExistsError(f"{str(final)!r} was replaced by other runs 10 times while this one "
                          f"tried to put its own in place; run it again once they are done.")


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE), so that a
    program opening `b` meanwhile finds the old or the new one, never neither. False where
    the system or filesystem cannot, and nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):   # a libc without it (glibc before 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_cwd, exchange = -100, 2   # AT_FDCWD, RENAME_EXCHANGE
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0


def sync_tree(path: Path) -> None:
    """fsync every file under directory `path`, then the directories: after a power cut,
    a directory renamed into place afterwards holds whole files."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files + dirs + ["."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def sync_directory(path: Path) -> None:
    """fsync directory `path` itself, so that a rename into it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def damaged_archive(error: BaseException) -> bool:
    """Whether `error`, raised while reading a tar archive, says that the archive is damaged
    (cut short or corrupted) rather than that it could not be read (an I/O error, with an
    errno): tarfile's errors, and those of its decompressors for a .tar.gz, .tar.bz2 or
    .tar.xz, which tarfile passes on as they are: EOFError (cut short), zlib.error,
    lzma.LZMAError, and bz2's OSError without an errno."""
    if isinstance(error, (tarfile.TarError, EOFError)):
        return True
    if isinstance(error, OSError):
        return error.errno is None
    return (type(error).__module__, type(error).__name__) in (("zlib", "error"),
                                                              ("_lzma", "LZMAError"))


def archive_members(tar: tarfile.TarFile,
                    archive: Path) -> tuple[str, dict[str, tarfile.TarInfo]]:
    """(the bundle's directory name, {path inside it: member} for its files) of an open
    bundle archive; ValueError for anything else in it: links, devices, absolute or escaping
    paths, several top levels, a file twice. Names are read as tar does: `./a//b` is `a/b`."""
    tops, files = set(), {}
    for member in tar.getmembers():
        name = PurePosixPath(member.name)
        parts = tuple(p for p in name.parts if p != ".")
        if (name.is_absolute() or ".." in parts or "\0" in member.name
                or not (member.isfile() or member.isdir()) or member.issparse()):
            kind = "a link" if member.issym() or member.islnk() else (
                "a sparse file (its size unpacks from far fewer bytes)" if member.issparse()
                else "an absolute or escaping path" if member.isfile() or member.isdir()
                else "not a regular file")
            raise ValueError(f"{archive}: member {member.name!r} is {kind}; a bundle archive "
                             f"holds only the bundle's files.")
        if not parts:   # "." itself
            continue
        tops.add(parts[0])
        if len(tops) > 1:   # said before a path that two tops share looks like a duplicate
            raise ValueError(f"{archive}: a bundle archive holds one directory (the bundle), "
                             f"found {', '.join(sorted(tops))}.")
        if member.isfile():
            if len(parts) < 2:
                raise ValueError(f"{archive}: file {member.name!r} is outside the bundle's "
                                 f"directory.")
            path = "/".join(parts[1:])
            if path in files:
                raise ValueError(f"{archive}: {parts[0]}/{path} is in it twice; a bundle "
                                 f"archive holds each file once.")
            files[path] = member
    if len(tops) != 1 or not files:
        found = ", ".join(sorted(tops)) or "nothing"
        raise ValueError(f"{archive}: a bundle archive holds one directory (the bundle), "
                         f"found {found}.")
    return tops.pop(), files


def bundle_files(path: Path) -> set[str] | None:
    """What bundle directory `path` may hold: manifest.json, manifest.sig (its signature,
    where signed) and the files it lists (an empty set without a manifest.json; None when
    the manifest cannot be read, or is not a bundle's: one with a format_version, and a
    path and sha256 for each file). Another
    tool's manifest.json that lists a user's files does not make them a bundle's, for an
    export or an unpack to replace."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        entries = manifest["files"]
        if not isinstance(manifest.get("format_version"), int) or not isinstance(entries, list) \
                or not all(isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
                           for e in entries):
            return None
        return {"manifest.json", SIGNATURE_FILE} | {entry["path"] for entry in entries}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def first_unlisted(path: Path, allowed: set[str]) -> str | None:
    """The first file or link under directory `path` (a relative POSIX path) that is not one
    of `allowed`; None when there is none (or a directory under it cannot be read)."""
    for root, dirs, files in os.walk(path):
        dirs.sort()
        here = Path(root).relative_to(path)
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in sorted((*files, *links)):
            if (here / name).as_posix() not in allowed:
                return (here / name).as_posix()
    return None


def bundle_around(path: Path) -> Path | None:
    """The bundle directory that `path` would lie inside (the nearest parent holding a
    manifest.json and only the files it lists), or None. Written there, `path` would be a
    file that bundle's manifest does not list, and no export or runtime.unpack would
    replace that bundle any more."""
    for parent in path.resolve().parents:
        known = bundle_files(parent)   # empty (falsy) without a manifest.json: no walk
        if known and holds_only(parent, known):
            return parent
    return None


def holds_only(path: Path, allowed: set[str]) -> bool:
    """Whether every file and link under directory `path` is one of `allowed` (relative
    POSIX paths). False where a directory under it cannot be read: what it holds is unknown
    (Path.rglob skips such a directory silently)."""

    def unreadable(error: OSError) -> None:
        raise error

    try:
        for root, dirs, files in os.walk(path, onerror=unreadable):
            here = Path(root).relative_to(path)
            links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            if any((here / name).as_posix() not in allowed for name in (*files, *links)):
                return False
    except OSError:
        return False
    return True
