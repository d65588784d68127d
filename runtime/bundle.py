"""Reading and verifying a bundle directory (the contract with the exporter).

A bundle is refused, with the file or field and the reason, when its manifest is missing or
unreadable, its format version is unknown, a listed file is missing, has the wrong size or the
wrong sha256, or its graph needs a newer opset than the installed onnxruntime runs; and, where
the caller names the keys it trusts (`signed_by`), when manifest.sig is missing or is not one
of those keys' signature of manifest.json (`_signature`). The runtime loads only files the
manifest lists, by paths inside the bundle.

    >>> bundle = Bundle.open("build/minilm-arm-cpu")
    >>> bundle.manifest["task"]
    'feature-extraction'
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ._files import (
    archive_members,
    bundle_around,
    bundle_files,
    check_name_room,
    damaged_archive,
    first_unlisted,
    holds_only,
    refused_why,
    remove_leftovers,
    replace_directory,
    sync_directory,
    sync_tree,
    work_dir_beside,
)
from ._signature import (
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    TrustedKeys,
    check_signature,
    trusted_keys,
)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

# onnxruntime release -> highest ai.onnx opset it implements: onnxruntime's compatibility table
# (docs/reference/compatibility) up to 1.20, then the newest opset any ai.onnx kernel of that
# release's CPU wheel was written for (get_all_opkernel_def, read off each release's wheel).
# Releases newer than the last row are assumed to run at least the last row's opset.
ORT_MAX_OPSET: tuple[tuple[tuple[int, int], int], ...] = (
    ((1, 10), 15),
    ((1, 11), 16),
    ((1, 12), 17),
    ((1, 14), 18),
    ((1, 15), 19),
    ((1, 17), 20),
    ((1, 18), 21),
    ((1, 21), 22),
    ((1, 23), 23),
    ((1, 24), 25),
    ((1, 25), 26),
    ((1, 28), 27),
    ((1, 32), 28),
)

# Providers compiled into onnxruntime's core library. A build with any other (CUDA, TensorRT,
# OpenVINO ... from their own shared libraries) is not asked for its kernels: listing them loads
# every provider library, and onnxruntime-gpu 1.31 whose TensorRT library could not load
# (no libnvinfer, as on most CUDA machines) crashed the process (SIGSEGV) doing so.
CORE_PROVIDERS = frozenset({"CPUExecutionProvider", "AzureExecutionProvider"})


def _unsafe_path(bundle: Path, name: str) -> str:
    """Why the manifest's file path `name` is refused: a link in the bundle that leads out
    of it (the manifest is fine: the file is not), else the path itself."""
    try:
        if "\0" not in name and not Path(name).is_absolute() and ".." not in Path(name).parts:
            here = bundle / name
            links = [p for p in (*reversed(here.parents), here)
                     if bundle in p.parents and p.is_symlink()]
            if links:
                return (f"{links[0]} is a link that leads outside the bundle; put the "
                        f"file itself there.")
    except (OSError, ValueError):   # a lone surrogate; a name the OS refuses
        pass
    return f"manifest.json lists an unsafe file path {name!r}."


class BundleError(ValueError):
    """A bundle that cannot be trusted or run; the message names the file or field."""


def max_supported_opset(ort_version: str) -> int:
    """Highest ai.onnx opset the given onnxruntime version runs (see ORT_MAX_OPSET)."""
    release = tuple(int(p) for p in ort_version.split(".")[:2] if p.isdigit())
    best = 0
    for first_release, opset in ORT_MAX_OPSET:
        if release >= first_release:
            best = opset
    return best


@functools.cache   # the installed onnxruntime does not change under a running process
def installed_max_opset() -> int:
    """Highest ai.onnx opset the installed onnxruntime runs: the newest opset any of its
    kernels was written for, asked of onnxruntime itself (releases newer than ORT_MAX_OPSET's
    last row run more than it says); the table where a build does not answer, and for builds
    with providers outside the core library (CORE_PROVIDERS), which are not asked."""
    import onnxruntime

    have = max_supported_opset(onnxruntime.__version__)
    if not set(onnxruntime.get_available_providers()) <= CORE_PROVIDERS:
        return have
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        kernels = ort_c.get_all_opkernel_def()
    except (ImportError, AttributeError, RuntimeError):
        return have
    return max([have] + [k.version_range[0] for k in kernels if k.domain in ("", "ai.onnx")])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    signer: str | None = None   # the id of the trusted key that signed it, where checked

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, signed_by=None) -> Bundle:
        """Read `path/manifest.json` and check that every listed file is there; with `verify`,
        also its size and sha256 (which reads every byte). With `signed_by` (a PEM public
        key's path or bytes, or a list of them), manifest.sig must be one of those keys'
        signature of manifest.json; that needs `verify`, since the signature vouches for
        the files through their sha256 sums."""
        if not isinstance(verify, bool):   # "no" verified; a check must not be off by typo
            raise TypeError(f"verify must be True or False, got {verify!r}.")
        keys = signing_keys(signed_by, verify)
        path = _given(path, "Bundle directory", "the directory that holds manifest.json")
        if path.is_file() and _is_archive(path):
            raise FileNotFoundError(f"{str(path)!r} is a bundle archive; install it with "
                                    f"runtime.unpack({str(path)!r}, DIRECTORY), then load "
                                    f"the directory that returns.")
        if path.is_file():
            raise FileNotFoundError(f"{str(path)!r} is a file; a bundle is the directory "
                                    f"that holds manifest.json, e.g. {str(path.parent)!r}.")
        if path.exists() and not path.is_dir():   # a device, a pipe
            raise FileNotFoundError(f"{str(path)!r} is not a directory; a bundle is the "
                                    f"directory that holds manifest.json.")
        if not path.is_dir():
            raise FileNotFoundError(f"Bundle directory {str(path)!r} does not exist.")
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise BundleError(f"{path} is not a bundle: it has no manifest.json "
                              f"(was the export interrupted or rejected?).")
        data = manifest_file.read_bytes()   # the bytes checked are the bytes read
        signer = None
        if keys is not None:
            signer = _signed(data, _read_signature(path), keys, path)
        try:
            manifest = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:   # nested too deep; a number too long
            raise BundleError(f"{manifest_file} is not valid JSON: {e}") from e
        if not isinstance(manifest, dict):
            raise BundleError(f"{manifest_file} must hold a JSON object.")
        bundle = cls(path, manifest, signer)
        bundle._check_fields()
        bundle._check_files(contents=verify)
        bundle._check_opset()
        return bundle

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists (and `open` verified); any other name, or one
        that leads outside the bundle, is refused: what the runtime loads is what was checked."""
        if not isinstance(name, str) or name not in self._listed():   # (a list: unhashable)
            raise BundleError(f"{self.path / 'manifest.json'}: {name!r} is not in its 'files' "
                              f"list, so it cannot be verified; re-export the bundle.")
        return self.path / name

    def _listed(self) -> set[str]:
        return {entry["path"] for entry in self.manifest["files"]}

    def _field(self, name: str, kind: type):
        value = self.manifest.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise BundleError(f"{self.path / 'manifest.json'}: field {name!r} must be "
                              f"{kind.__name__}, got {value!r}.")
        return value

    def _check_fields(self) -> None:
        version = self._field("format_version", int)
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise BundleError(
                f"{self.path / 'manifest.json'}: format_version {version} is not supported by "
                f"this runtime (supports {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
                f"update the runtime or re-export the bundle.")
        for name, kind in (("task", str), ("files", list), ("opset", int), ("target", dict)):
            self._field(name, kind)
        root = self.path.resolve()
        seen: set[Path] = set()
        for i, entry in enumerate(self.manifest["files"]):
            if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                    and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("bytes"), int)
                    and not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0):
                raise BundleError(f"{self.path / 'manifest.json'}: files[{i}] must be "
                                  f"{{\"path\": str, \"bytes\": int, \"sha256\": str}}, "
                                  f"got {entry!r}.")
            name = entry["path"]
            try:
                inside = "\0" not in name and root in (root / name).resolve().parents
            except (OSError, RuntimeError, ValueError):   # a link loop; a lone surrogate
                inside = False
            if not name or Path(name).is_absolute() or not inside:
                raise BundleError(_unsafe_path(self.path, name))
            same = (root / name).resolve()   # "a//b" and "./a/b" are "a/b"
            if same in seen:
                raise BundleError(f"{self.path / 'manifest.json'}: files[{i}] lists {name!r} "
                                  f"again; a manifest lists each file once.")
            seen.add(same)

    def _check_files(self, *, contents: bool) -> None:
        for entry in self.manifest["files"]:
            name = entry["path"]
            file = self.path / name
            if not file.is_file():
                what = ("a directory" if file.is_dir() else "not a regular file"
                        if file.exists() else "missing")
                raise BundleError(f"{self.path / name}: listed in manifest.json but {what}.")
            if not contents:
                continue
            size = file.stat().st_size
            if size != entry.get("bytes"):
                raise BundleError(f"{self.path / name}: {size} bytes, manifest.json says "
                                  f"{entry.get('bytes')} (truncated or replaced file).")
            if sha256_of(file) != entry.get("sha256"):
                raise BundleError(f"{self.path / name}: sha256 does not match manifest.json "
                                  f"(the file was modified or corrupted); re-copy the bundle.")

    def _check_opset(self) -> None:
        import onnxruntime

        needed = self.manifest["opset"]
        have = installed_max_opset()
        if needed > have:
            raise BundleError(
                f"{self.path / 'manifest.json'}: the graph needs ai.onnx opset {needed}, but "
                f"onnxruntime {onnxruntime.__version__} runs opsets up to {have}; upgrade "
                f"onnxruntime or export with a target whose opset is <= {have}.")


# A device-wide policy: where an application names no keys, the public keys listed here
# (.pub paths, separated by os.pathsep) must have signed every bundle that runtime.load,
# runtime.unpack and `python -m runtime` accept.
TRUSTED_KEYS_VARIABLE = "EDGE_TRUSTED_KEYS"


def signing_keys(signed_by, verify: bool = True, *, policy: bool = False) -> TrustedKeys | None:
    """The keys `signed_by` names (None: no signature is asked for; with `policy`, those of
    EDGE_TRUSTED_KEYS where it is set); refused with verify=False, where the files' sha256
    sums, through which the signature vouches for them, are not read."""
    source = "signed_by"
    if signed_by is None and policy and os.environ.get(TRUSTED_KEYS_VARIABLE, "").strip():
        source = TRUSTED_KEYS_VARIABLE
        signed_by = [p for p in os.environ[TRUSTED_KEYS_VARIABLE].split(os.pathsep) if p.strip()]
    if signed_by is None:
        return None
    if not verify:
        raise ValueError(f"{source} needs verify=True: the signature vouches for "
                         f"manifest.json, and manifest.json for the files through their sha256 "
                         f"sums, which verify=False does not read.")
    if source == "signed_by":
        return trusted_keys(signed_by)
    try:
        return trusted_keys(signed_by)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{TRUSTED_KEYS_VARIABLE}: {e}") from None


def _read_signature(path: Path) -> bytes | None:
    """manifest.sig's bytes in bundle directory `path` (at most MAX_SIGNATURE_BYTES + 1),
    None where there is none."""
    try:
        with open(path / SIGNATURE_FILE, "rb") as f:
            return f.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise BundleError(f"{path / SIGNATURE_FILE} is a directory, not a signature.") from None


def _signed(manifest: bytes, signature: bytes | None, keys: TrustedKeys, where) -> str:
    """check_signature's key id, or a BundleError naming `where`."""
    try:
        return check_signature(manifest, signature, keys)
    except ValueError as e:
        raise BundleError(f"{where}: {e}") from None


def unpack(archive: str | Path, into: str | Path, *, signed_by=None) -> Path:
    """Install the bundle in `archive` (the .tar `python -m exporter --tar` writes) as the
    directory `into/<bundle name>`, and return that path.

    The bundle appears whole and verified, or not at all. Before anything is written, the
    archive must hold the bundle's directory and nothing else: regular files only (no links
    or devices, no path that leaves the directory), each one its manifest lists, of the size
    it lists. Then it is unpacked beside its place, checked as `runtime.load` checks a
    bundle (sha256, format version, opset, settings, tokenizer, the graph loaded in
    onnxruntime on the CPU) and renamed into place. An earlier bundle of that name is
    replaced, and so is an empty directory; anything else there is refused. With
    `signed_by` (as `runtime.load` takes it), an archive whose manifest.json is not signed
    by one of those keys is refused before anything is written (without it, EDGE_TRUSTED_KEYS
    names the keys where it is set).

        >>> runtime.unpack("/media/usb/minilm-arm-cpu.tar", "/opt/models",
        ...                signed_by="/etc/edge/bundle-key.pub")
        PosixPath('/opt/models/minilm-arm-cpu')
    """
    keys = signing_keys(signed_by, policy=True)
    archive = _given(archive, "Bundle archive", "the .tar file")
    into = _given(into, "Directory", "where the bundle goes ('.' for the current directory)")
    try:   # checked before the copy, not by the session that loads the copy
        str(into.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise BundleError(f"onnxruntime opens only paths that are UTF-8, and {str(into)!r} "
                          f"is not (a directory named in another encoding); unpack into a "
                          f"directory that is.") from None
    if archive.is_dir():
        raise FileNotFoundError(f"{str(archive)!r} is a directory; runtime.load() a bundle "
                                f"directory, runtime.unpack() a bundle archive (.tar).")
    if archive.exists() and not archive.is_file():   # it is read twice: checked, then copied
        raise FileNotFoundError(f"Bundle archive {str(archive)!r} is not a regular file (a "
                                f"pipe or a device); save the archive to a file and unpack "
                                f"that.")
    if not archive.is_file():
        raise FileNotFoundError(f"Bundle archive {str(archive)!r} does not exist.")
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.TarError:
        raise BundleError(f"{archive} is not a tar archive; a bundle archive is the .tar "
                          f"that `python -m exporter --tar` writes.") from None
    except Exception as e:   # a .tar.gz cut short in its first block
        if not damaged_archive(e):
            raise
        raise BundleError(f"{archive} is damaged ({e}); copy it again.") from None
    with tar:
        try:
            name, files = archive_members(tar, archive)
            manifest = _archived_manifest(tar, files, archive, name, keys)
        except ValueError as e:   # BundleError included
            raise BundleError(str(e)) from None
        except Exception as e:   # cut short in copying, or corrupted
            if not damaged_archive(e):
                raise
            raise BundleError(f"{archive} is damaged ({e}); copy it again.") from None
        sizes = _archived_sizes(manifest, files, archive, name)
        final = into / name
        try:
            check_name_room(final, "Bundle directory")
        except ValueError as e:
            raise BundleError(f"{archive}: {e}") from None
        if (around := bundle_around(final)) is not None:
            raise FileExistsError(f"{str(into)!r} lies inside the bundle {str(around)!r} (or "
                                  f"is one), which would then hold files its manifest does "
                                  f"not list, and no unpack could replace it. Unpack into the "
                                  f"directory that holds the bundles, e.g. "
                                  f"{str(around.parent)!r}.")
        # A damaged install (its manifest.json unreadable) is replaced where it holds only
        # the archive's files; a folder of the user's that merely has a model.onnx and a
        # tokenizer.json, no manifest.json, is not an install.
        # An empty directory is replaced too, as the exporter's --output does (a device
        # image may make /opt/models/<bundle> in advance).
        if final.is_symlink() or final.exists() and not (final.is_dir() and (
                _a_bundle(final) or _empty(final) or (final / "manifest.json").is_file()
                and holds_only(final, set(sizes)))):
            known = bundle_files(final) if final.is_dir() and not final.is_symlink() else None
            extra = first_unlisted(final, known | set(sizes)) if known else None
            if extra is not None:   # verify passes it: the runtime reads only listed files
                raise FileExistsError(f"{str(final)!r} is a bundle that also holds {extra!r}, "
                                      f"which neither its manifest.json nor the archive's "
                                      f"lists; refusing to delete it. Move it out of the "
                                      f"bundle, or unpack into another directory.")
            raise FileExistsError(f"{str(final)!r} exists and is not a bundle; refusing to "
                                  f"replace it. Unpack into another directory.")
        # what this unpack creates goes again if it fails (a damaged archive left z/a/b)
        with _made_removed_unless(final, into):
            try:
                try:
                    into.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):   # a file on the way
                    raise NotADirectoryError(f"{str(_file_on_the_way(into))!r} exists and is "
                                             f"not a directory; unpack into a directory.") \
                        from None
                remove_leftovers(final)   # of an unpack killed before its cleanup could run
                work = work_dir_beside(final)
            except NotADirectoryError:
                raise
            except OSError as e:
                raise _unwritable(e, into) from None
            try:
                need, free = sum(m.size for m in files.values()), shutil.disk_usage(work).free
                if need > free:   # refused, rather than the partition filled for other programs
                    raise OSError(errno.ENOSPC, f"{archive} unpacks to {need / 1e6:.1f} MB and "
                                                f"{str(into)!r} has {free / 1e6:.1f} MB free; "
                                                f"free some space or unpack elsewhere")
                for path, member in files.items():
                    dest = work / path
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as source, open(dest, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                try:
                    # fields, every listed file's size and sha256, opset; then all that load
                    # checks beyond the files (settings, pooling, labels, tokenizer, the graph
                    # in onnxruntime), as `python -m runtime verify` does: a manifest damaged
                    # into another valid JSON ("mean" -> "mdan") replaced a good install
                    from .model import Model

                    Model(Bundle.open(work, signed_by=keys), threads=1, spinning=False,
                          providers=["CPUExecutionProvider"]).close()
                except BundleError as e:   # name the archive's file, not the hidden work copy
                    message = str(e).replace(str(work), name).replace(repr(str(work))[1:-1], name)
                    raise BundleError(f"{archive}: {message}") from None
                sync_tree(work)   # whole files on disk before the rename makes them the bundle
                replace_directory(work, final)
                sync_directory(into)
            except BundleError:
                raise
            except Exception as e:   # read from the archive; writes fail with an errno
                if not damaged_archive(e):
                    raise
                raise BundleError(f"{archive} is damaged ({e}); copy it again.") from None
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return final


def _unwritable(error: OSError, into: Path) -> OSError:
    """`error`, or where it is no permission or a read-only file system, a PermissionError
    naming the directory that refused rather than a hidden work directory."""
    why = refused_why(error, into)
    if why is None:
        return error
    return PermissionError(f"Cannot unpack into {str(into)!r}: {why}. Unpack into another "
                           f"directory.")


def _archived_manifest(tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo], archive: Path,
                       name: str, keys: TrustedKeys | None = None) -> dict:
    """The manifest.json in a bundle archive, read without unpacking anything, its
    signature checked where `keys` are given, and its fields checked as `Bundle.open`
    checks them."""
    entry = files.get("manifest.json")
    if entry is None:
        raise BundleError(f"{archive} has no {name}/manifest.json; it is not a bundle archive.")
    if entry.size > 64 << 20:
        raise BundleError(f"{archive}: {name}/manifest.json has {entry.size} bytes; a "
                          f"manifest is a few kB.")
    data = tar.extractfile(entry).read()
    if keys is not None:
        signature = files.get(SIGNATURE_FILE)
        if signature is not None:
            signature = tar.extractfile(signature).read(MAX_SIGNATURE_BYTES + 1)
        _signed(data, signature, keys, archive)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:   # nested too deep; a number too long
        raise BundleError(f"{archive}: {name}/manifest.json is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{archive}: {name}/manifest.json must hold a JSON object.")
    from .model import checked_settings

    try:
        listed = Bundle(Path(name), manifest)
        listed._check_fields()
        listed._check_opset()
        checked_settings(listed)   # task, lengths, pooling, generation, threads, providers
    except BundleError as e:
        raise BundleError(f"{archive}: {e}") from None
    return manifest


@contextlib.contextmanager
def _made_removed_unless(final: Path, directory: Path):
    """The directories up to `directory` that do not exist yet are removed, while empty,
    unless `final` exists when the block ends."""
    target = directory.absolute()
    made = [p for p in (target, *target.parents) if not p.exists()]   # deepest first
    try:
        yield
    finally:
        if made and not final.exists():
            for parent in made:
                try:
                    parent.rmdir()
                except OSError:
                    break


def _file_on_the_way(directory: Path) -> Path:
    """The nearest of `directory` and its parents that exists (a file, where mkdir
    refused)."""
    return next((p for p in (directory, *directory.parents) if p.exists()), directory)


def _empty(path: Path) -> bool:
    try:
        return next(os.scandir(path), None) is None
    except OSError:
        return False


def _archived_sizes(manifest: dict, files: dict[str, tarfile.TarInfo], archive: Path,
                    name: str) -> dict[str, int | None]:
    """{path: bytes} of what the archive's manifest lists (manifest.json itself and its
    signature, where the archive has one: None), once every file in the archive is one of
    those, of that size, and every one it lists is in the archive: checked before anything
    is written."""
    sizes = {entry["path"]: entry["bytes"] for entry in manifest["files"]}
    sizes["manifest.json"] = None
    if SIGNATURE_FILE in files:
        if files[SIGNATURE_FILE].size > MAX_SIGNATURE_BYTES:
            raise BundleError(f"{archive}: {name}/{SIGNATURE_FILE} has "
                              f"{files[SIGNATURE_FILE].size} bytes; a signature has about "
                              f"140.")
        sizes[SIGNATURE_FILE] = None
    for path, member in files.items():
        if path not in sizes:
            raise BundleError(f"{archive}: {name}/{path} is not listed in its manifest.json; "
                              f"a bundle archive holds only the bundle.")
        if sizes[path] not in (None, member.size):
            raise BundleError(f"{archive}: {name}/{path} has {member.size} bytes, its "
                              f"manifest.json says {sizes[path]}; copy the archive again.")
    missing = sorted(set(sizes) - set(files))
    if missing:
        raise BundleError(f"{archive}: {name}/{missing[0]} is listed in its manifest.json but "
                          f"not in the archive; copy the archive again.")
    return sizes


def _is_archive(path: Path) -> bool:
    """Whether file `path` is a tar archive, a .tar.gz cut short included."""
    try:
        return tarfile.is_tarfile(path)
    except Exception as e:
        if not damaged_archive(e):
            raise
        return True


def _given(path: str | Path, what: str, name: str) -> Path:
    """`path` as a Path; FileNotFoundError where it can name nothing: "" or blank (which Path
    reads as ".", the current directory: an updater's unset $DEST) or a name longer than
    the system takes (which every later check would raise as an I/O error)."""
    if isinstance(path, str) and not path.strip():
        raise FileNotFoundError(f"{what} {path!r} is empty; name {name}.")
    path = Path(path)
    try:
        os.lstat(path)
    except OSError as e:
        if e.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            shown = str(path) if len(str(path)) < 80 else str(path)[:70] + "..."
            raise FileNotFoundError(f"{what} {shown!r}: {e.strerror}; name {name}.") from None
    return path


def _a_bundle(path: Path) -> bool:
    """Whether directory `path` is a bundle: manifest.json and only the files it lists."""
    known = bundle_files(path)
    return path.is_dir() and bool(known) and holds_only(path, known)
