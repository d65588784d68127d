"""The on-device runtime: bundle verification, embed(), and its light footprint."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import runtime
from runtime import BundleError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bundle_copy(minilm_bundle, tmp_path):
    """A private copy of the shared bundle that a test may damage."""
    return Path(shutil.copytree(minilm_bundle, tmp_path / "bundle"))


def edit_manifest(path: Path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def rehashed(path: Path, name: str) -> dict:
    """The bundle's manifest with file `name`'s size and sha256 those of its new bytes (a
    rewrite verify cannot tell from the exporter's); returns the manifest."""
    from runtime.bundle import sha256_of

    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == name:
            entry.update(bytes=(path / name).stat().st_size, sha256=sha256_of(path / name))
    edit_manifest(path, files=manifest["files"])
    return manifest


def test_embed_shape_norm_and_order(minilm_bundle, eval_texts):
    model = runtime.load(minilm_bundle)
    texts = eval_texts[:40]
    batched = model.embed(texts, batch_size=16)
    assert batched.shape == (40, 384) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([model.embed([t]) for t in texts[:8]])
    # padding changes nothing for the real tokens; int8 kernels may round differently
    # across batch shapes, so equal to well below the quantization error
    assert (one_by_one * batched[:8]).sum(axis=1).min() > 0.999
    assert model.embed([]).shape == (0, 384)


def test_prompts_go_before_each_text(minilm_bundle, bundle_copy):
    """A model with sentence-transformers prompts: the default one before every text,
    another by name, as sentence-transformers' encode(prompt_name=...) does."""
    plain = runtime.load(minilm_bundle)
    assert plain.prompts == {}
    manifest_file = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["pooling"] |= {"prompts": {"query": "query: ", "passage": "passage: "},
                            "default_prompt": "query"}
    manifest_file.write_text(json.dumps(manifest))
    model = runtime.load(bundle_copy)
    texts = ["turn on the kitchen lights", "lock the front door"]
    assert model.prompts == {"query": "query: ", "passage": "passage: "}
    np.testing.assert_array_equal(model.embed(texts), plain.embed(["query: " + t for t in texts]))
    np.testing.assert_array_equal(model.embed(texts, prompt_name="passage"),
                                  plain.embed(["passage: " + t for t in texts]))
    assert not np.allclose(model.embed(texts), plain.embed(texts), atol=1e-3)
    # the text itself, as sentence-transformers' encode(prompt=...): "" for none
    np.testing.assert_array_equal(model.embed(texts, prompt=""), plain.embed(texts))
    np.testing.assert_array_equal(model.embed(texts, prompt="doc: "),
                                  plain.embed(["doc: " + t for t in texts]))
    with pytest.raises(ValueError, match="prompt_name or prompt, not both"):
        model.embed(texts, prompt="", prompt_name="query")
    with pytest.raises(ValueError, match="Unknown prompt_name 'doc'; this model's prompts: "
                                         "'query', 'passage'"):
        model.embed(texts, prompt_name="doc")
    with pytest.raises(ValueError, match="prompts: none"):
        plain.embed(texts, prompt_name="query")
    with pytest.raises(TypeError, match="prompt_name must be a str or None, got int"):
        model.embed(texts, prompt_name=1)
    with pytest.raises(TypeError, match="item 1 is int"):   # the texts are checked as before
        model.embed(["a", 2])


def _names(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def test_a_bundle_archive_installs_verified_and_whole(minilm_bundle, tmp_path):
    """--tar writes the bundle as one file for flashing; runtime.unpack installs it only
    once every file checks out, replacing an earlier install and nothing else."""
    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    into = tmp_path / "models"
    installed = runtime.unpack(archive, into)
    assert installed == into / "minilm-arm-cpu"
    assert _names(installed) == _names(minilm_bundle)
    for path in minilm_bundle.iterdir():
        assert (installed / path.name).read_bytes() == path.read_bytes()
    texts = ["turn on the kitchen lights", "lock the front door"]
    np.testing.assert_array_equal(runtime.load(installed).embed(texts),
                                  runtime.load(minilm_bundle).embed(texts))
    with pytest.raises(FileNotFoundError, match="is a bundle archive; install it with "
                                                "runtime.unpack"):
        runtime.load(archive)

    # A damaged copy (one flipped byte in tokenizer.json) is refused, naming the file; the
    # installed bundle stays as it was and nothing is left beside it.
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        data[tar.getmember("minilm-arm-cpu/tokenizer.json").offset_data + 100] ^= 1
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    before = _names(into)
    with pytest.raises(BundleError, match="damaged.tar: minilm-arm-cpu/tokenizer.json: sha256 "
                                          "does not match"):
        runtime.unpack(damaged, into)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[:5_000_000])
    with pytest.raises(BundleError, match="truncated.tar is damaged"):
        runtime.unpack(truncated, into)
    assert _names(into) == before
    runtime.unpack(archive, into)   # again: replaces its earlier install
    assert _names(into) == before

    # Anything but a bundle's files is refused before anything is written.
    def packed(name: str, **fields) -> Path:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.tar"
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(name)
            for key, value in fields.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(b"x" * info.size))
        return path

    for path, message in [
        (packed("minilm-arm-cpu/../../evil", size=1), "is an absolute or escaping path"),
        (packed("/etc/evil", size=1), "is an absolute or escaping path"),
        (packed("minilm-arm-cpu/manifest.json", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
         "is a link"),
        (packed("minilm-arm-cpu/null", type=tarfile.CHRTYPE), "not a regular file"),
        (packed("loose.json", size=1), "outside the bundle's directory"),
        (packed("minilm-arm-cpu/model.onnx", size=1), "has no minilm-arm-cpu/manifest.json"),
    ]:
        with pytest.raises(BundleError, match=message):
            runtime.unpack(path, into)
    extra = tmp_path / "extra.tar"   # the bundle and one file more, refused before writing
    with tarfile.open(archive) as source, tarfile.open(extra, "w") as tar:
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member))
        tar.addfile(tarfile.TarInfo("minilm-arm-cpu/run.sh"), io.BytesIO())
    with pytest.raises(BundleError, match="minilm-arm-cpu/run.sh is not listed in its "
                                          "manifest.json"):
        runtime.unpack(extra, into)
    (tmp_path / "text.tar").write_text("not a tar")
    with pytest.raises(BundleError, match="is not a tar archive"):
        runtime.unpack(tmp_path / "text.tar", into)
    assert _names(into) == before and not (tmp_path.parent / "evil").exists()

    # A directory of the user's where the bundle would go is not replaced.
    mine = tmp_path / "mine" / "minilm-arm-cpu"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not a bundle"):
        runtime.unpack(archive, mine.parent)
    assert _names(mine) == ["notes.txt"]


def _repacked(archive: Path, path: Path, *, rename=lambda name: name, manifest=None,
              extra=()) -> Path:
    """`archive`'s members under new names, with another manifest.json (a dict, or the
    file's bytes) and extra members."""
    with tarfile.open(archive) as source, tarfile.open(path, "w") as tar:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if manifest is not None and member.name.endswith("/manifest.json"):
                data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
            member.name, member.size = rename(member.name), len(data)
            tar.addfile(member, io.BytesIO(data))
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_reads_names_as_tar_does_and_checks_the_manifest_before_writing(
        minilm_bundle, tmp_path):
    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    into = tmp_path / "models"
    # `tar -cf x.tar ./minilm-arm-cpu` names members ./minilm-arm-cpu/...: the same bundle
    dotted = _repacked(archive, tmp_path / "dotted.tar", rename=lambda n: "./" + n)
    assert runtime.unpack(dotted, into) == into / "minilm-arm-cpu"
    before = _names(into)
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    huge = b"{" + b" " * (1 << 20) + b"}"
    for path, message in [
        # a second manifest.json slipped past the size checks, and a .tar.gz of zeros could
        # fill the disk before it was read
        (_repacked(archive, tmp_path / "twice.tar",
                   extra=[("minilm-arm-cpu/manifest.json", huge)]),
         "minilm-arm-cpu/manifest.json is in it twice"),
        # two bundles' directories: said as such, not as a file in it twice
        (_repacked(archive, tmp_path / "two.tar", extra=[("other/manifest.json", b"{}")]),
         "holds one directory .the bundle., found minilm-arm-cpu, other"),
        (_repacked(archive, tmp_path / "files.tar", manifest=manifest | {"files": 5}),
         "field 'files' must be list"),
        # a file listed twice was counted twice by verify's totals
        (_repacked(archive, tmp_path / "listed.tar", manifest=manifest | {
            "files": [*manifest["files"], {**manifest["files"][0],
                                           "path": "./" + manifest["files"][0]["path"]}]}),
         r"files\[\d+\] lists '\./.*' again; a manifest lists each file once"),
        (_repacked(archive, tmp_path / "path.tar", manifest=manifest | {
            "files": [*manifest["files"], {"path": ["x"], "bytes": 1, "sha256": "0"}]}),
         r"files\[\d+\] must be"),
        (_repacked(archive, tmp_path / "missing.tar", manifest=manifest | {
            "files": [*manifest["files"], {"path": "stage1.onnx", "bytes": 1, "sha256": "0"}]}),
         "minilm-arm-cpu/stage1.onnx is listed in its manifest.json but not in the archive"),
        (_repacked(archive, tmp_path / "opset.tar", manifest=manifest | {"opset": 999}),
         "needs ai.onnx opset 999"),
        # valid JSON that load refuses: one flipped bit ("mean" -> "mdan") in transit
        # replaced the good install with one that no longer loaded
        (_repacked(archive, tmp_path / "mdan.tar", manifest=manifest | {
            "pooling": manifest["pooling"] | {"mode": "mdan"}}), "pooling"),
        (_repacked(archive, tmp_path / "batch.tar", manifest=manifest | {"target": {
            **manifest["target"], "runtime": manifest["target"]["runtime"] | {
                "batch_size": 0}}}), "batch_size must be a positive int"),
    ]:
        with pytest.raises(BundleError, match=message):
            runtime.unpack(path, into)
    assert _names(into) == before
    runtime.load(into / "minilm-arm-cpu")   # the install they would have replaced


def test_unpack_refuses_settings_load_refuses_before_writing_anything(minilm_bundle, tmp_path):
    """max_length 0 or an unknown task were refused only once the bundle was unpacked: on a
    nearly full partition that was "No space left on device", exit 1, not the bad field."""
    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    into = tmp_path / "models"
    for name, changes, message in [
            ("length", {"max_length": 0}, "max_length .* must be a positive int, got 0"),
            ("task", {"task": "text-to-speech"}, "task 'text-to-speech' is not one"),
            ("threads", {"target": {**manifest["target"], "runtime": {"threads": 10**6}}},
             "target.runtime.threads is 1000000")]:
        with pytest.raises(BundleError, match=message):
            runtime.unpack(_repacked(archive, tmp_path / f"{name}.tar",
                                     manifest=manifest | changes), into)
        assert not into.exists()


def test_unpack_refuses_a_sparse_member_and_more_than_the_disk_holds(minilm_bundle, tmp_path,
                                                                     monkeypatch):
    """A 24 MB archive of a sparse 50 GiB file whose size the manifest listed filled the
    partition (other programs starved) before any check; so could a .tar.gz of zeros."""
    import errno

    import runtime.bundle

    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    into = tmp_path / "models"
    installed = runtime.unpack(archive, into)
    before = _names(into)
    sparse = tmp_path / "sparse"
    shutil.copytree(minilm_bundle, sparse / "minilm-arm-cpu")
    with open(sparse / "minilm-arm-cpu" / "report.md", "r+b") as f:
        f.truncate(1 << 30)   # a hole of 1 GiB
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "report.md":
            entry["bytes"] = 1 << 30
    (sparse / "minilm-arm-cpu" / "manifest.json").write_text(json.dumps(manifest))
    made = subprocess.run(["tar", "--sparse", "--format=pax", "-cf", str(tmp_path / "s.tar"),
                           "minilm-arm-cpu"], cwd=sparse, capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"no GNU tar to write a sparse member: {made.stderr[:200]!r}")
    with pytest.raises(BundleError, match="report.md' is a sparse file"):
        runtime.unpack(tmp_path / "s.tar", into)
    assert _names(into) == before
    free = SimpleNamespace(total=1 << 40, used=0, free=10 << 20)
    monkeypatch.setattr(runtime.bundle.shutil, "disk_usage", lambda path: free)
    with pytest.raises(OSError, match=r"unpacks to \d+\.\d MB and .* has 10.5 MB free") as e:
        runtime.unpack(archive, into)
    assert e.value.errno == errno.ENOSPC and _names(into) == before
    runtime.load(installed)


def test_two_first_installs_at_once_both_succeed(minilm_bundle, tmp_path, monkeypatch):
    """The run that renamed second failed ("Directory not empty" naming its hidden work
    directory, exit 1) where the other's bundle had arrived since it looked."""
    import runtime._files as files

    into = tmp_path / "models"
    other = Path(shutil.copytree(minilm_bundle, into / ".other"))
    real = os.rename

    def rename(source, dest):   # the other install lands just before ours renames
        if Path(dest) == into / "minilm-arm-cpu" and other.exists():
            real(other, dest)
        return real(source, dest)

    monkeypatch.setattr(files.os, "rename", rename)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)   # the rename-aside path
    installed = runtime.unpack(minilm_bundle.with_name("minilm-arm-cpu.tar"), into)
    assert sorted(p.name for p in into.iterdir()) == ["minilm-arm-cpu"]
    runtime.load(installed)


@pytest.mark.parametrize("failing, error", [(".bundle.new", "EIO"), ("bundle", "EBUSY")])
def test_a_replacement_that_cannot_be_renamed_leaves_the_old_one_and_nothing_beside_it(
        tmp_path, monkeypatch, failing, error):
    """The new bundle not renamed into place (an I/O error), or the old one not renamed
    aside (a mount point, EBUSY): the old one stays, and nothing beside it (the empty
    directory made for the old bundle stayed)."""
    import errno

    import runtime._files as files

    old, new = tmp_path / "bundle", tmp_path / ".bundle.new"
    for directory, text in ((old, "old"), (new, "new")):
        directory.mkdir()
        (directory / "f").write_text(text)
    real = os.rename

    def rename(source, dest):
        if Path(source) == tmp_path / failing:
            raise OSError(getattr(errno, error), error)
        return real(source, dest)

    monkeypatch.setattr(files.os, "rename", rename)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)   # the rename-aside path
    with pytest.raises(OSError, match=error):
        files._rename_over(new, old)
    assert (old / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.new", "bundle"]


def test_unpack_refuses_a_bundle_name_too_long_for_its_work_directory(minilm_bundle, tmp_path):
    archive = _repacked(minilm_bundle.with_name("minilm-arm-cpu.tar"), tmp_path / "long.tar",
                        rename=lambda n: n.replace("minilm-arm-cpu", "b" * 245))
    with pytest.raises(BundleError, match=r"Bundle directory name 'b+'\.\.\. is 245 bytes long"):
        runtime.unpack(archive, tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_unpack_recovers_from_what_a_killed_or_damaged_install_left(minilm_bundle, tmp_path):
    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    into = tmp_path / "models"
    installed = runtime.unpack(archive, into)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)   # a pid whose process has exited
    # an unpack killed (SIGKILL, power loss) mid-copy, and a replaced copy that a killed
    # update never removed, under a pid the device reuses after a reboot: this one's
    killed = into / f".minilm-arm-cpu.{dead}.a1b2c3d4"
    stale = into / f".minilm-arm-cpu.old-{os.getpid()}"
    for path in (killed, stale):
        path.mkdir()
        (path / "model.onnx").write_bytes(b"x" * 1000)
    (installed / "manifest.json").write_text("")   # and a damaged install
    with pytest.raises(BundleError):
        runtime.load(installed)
    assert runtime.unpack(archive, into) == installed
    runtime.load(installed)
    # both gone: this process did not make the .old-<pid> that has its pid
    assert not killed.exists() and not stale.exists()
    runtime.unpack(archive, into)
    assert sorted(p.name for p in into.iterdir()) == ["minilm-arm-cpu"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_a_replaced_bundle_directory_is_never_missing(tmp_path):
    """An application loading the bundle while an update replaces it finds the old one or the
    new one: the two directories swap in one step (with two renames, it was briefly gone)."""
    import tempfile
    import threading

    from runtime._files import replace_directory

    final = tmp_path / "bundle"
    final.mkdir()
    (final / "version").write_text("0")
    stop, missing = threading.Event(), []

    def watch():
        while not stop.is_set():
            if not (final / "version").is_file():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 301):
            new = Path(tempfile.mkdtemp(dir=tmp_path))
            (new / "version").write_text(str(i))
            replace_directory(new, final)
    finally:
        stop.set()
        watcher.join()
    assert (final / "version").read_text() == "300" and not missing
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_verify_of_a_bundle_replaced_meanwhile_checks_the_new_one(bundle_copy, tmp_path,
                                                                   monkeypatch, capsys):
    """A health check running `verify` while an update installed said the bundle was
    corrupt (a file of the new bundle against the old manifest), exit 2: a rollback."""
    from runtime.__main__ import main
    from runtime._files import replace_directory

    new = Path(shutil.copytree(bundle_copy, tmp_path / ".bundle.new"))
    edit_manifest(new, name="the-new-one")
    real = runtime.Tokenizer.from_file.__func__
    swaps = []

    def from_file(cls, path, **options):
        if not swaps:
            swaps.append(path)
            replace_directory(new, bundle_copy)
        return real(cls, path, **options)

    monkeypatch.setattr(runtime.Tokenizer, "from_file", classmethod(from_file))
    assert main(["verify", str(bundle_copy)]) == 0
    assert swaps and "the-new-one (feature-extraction" in capsys.readouterr().out


def test_a_bundle_replaced_while_it_loads_is_loaded_whole(bundle_copy, tmp_path,
                                                           monkeypatch):
    """runtime.unpack swaps the new directory into place: a load running meanwhile, its
    manifest verified before the swap and its files read after, loads again, so that the
    model's manifest is the one of the files it runs (it kept the old manifest)."""
    from runtime._files import replace_directory

    new = Path(shutil.copytree(bundle_copy, tmp_path / ".bundle.new"))
    edit_manifest(new, name="the-new-one")
    real = runtime.Tokenizer.from_file.__func__
    swaps = []

    def from_file(cls, path, **options):   # read by Model, after Bundle.open verified
        if not swaps:
            swaps.append(path)
            replace_directory(new, bundle_copy)   # what runtime.unpack does at the end
        return real(cls, path, **options)

    monkeypatch.setattr(runtime.Tokenizer, "from_file", classmethod(from_file))
    model = runtime.load(bundle_copy)
    assert swaps and model.manifest["name"] == "the-new-one"
    assert model.embed(["lights on"]).shape == (1, 384)
    monkeypatch.undo()

    # swapped while the files are hashed: the new files are no error of the bundle's
    import hashlib

    from runtime import bundle as bundle_module

    newer = Path(shutil.copytree(bundle_copy, tmp_path / ".bundle.newer"))
    data = json.dumps(json.loads((newer / "tokenizer.json").read_text())).encode()
    (newer / "tokenizer.json").write_bytes(data)
    manifest = json.loads((newer / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "tokenizer.json":
            entry |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    edit_manifest(newer, files=manifest["files"], name="the-newer-one")
    real_sha = bundle_module.sha256_of

    def sha256_of(path):
        if len(swaps) == 1:
            swaps.append(path)
            replace_directory(newer, bundle_copy)
        return real_sha(path)

    monkeypatch.setattr(bundle_module, "sha256_of", sha256_of)
    model = runtime.load(bundle_copy)
    assert len(swaps) == 2 and model.manifest["name"] == "the-newer-one"


def test_a_replaced_directory_takes_the_modes_of_the_umask(tmp_path):
    """What a writer made private (safetensors writes 0600) becomes readable as any file the
    user makes, for a device's service account; mkdtemp's 0700 too."""
    import tempfile

    from runtime._files import replace_directory

    new = Path(tempfile.mkdtemp(dir=tmp_path))
    (new / "sub").mkdir(mode=0o700)
    for path in (new / "weights.safetensors", new / "sub" / "x.json"):
        path.write_text("{}")
        path.chmod(0o600)
    (tmp_path / "file").touch()   # what the umask gives a plain file and directory
    (tmp_path / "dir").mkdir()
    file_mode, dir_mode = ((tmp_path / name).stat().st_mode & 0o777 for name in ("file", "dir"))
    replace_directory(new, tmp_path / "out")
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
             for p in (tmp_path / "out").rglob("*")}
    assert modes == {"out/weights.safetensors": file_mode, "out/sub/x.json": file_mode,
                     "out/sub": dir_mode}
    assert (tmp_path / "out").stat().st_mode & 0o777 == dir_mode


@pytest.mark.parametrize("kind", ["gz", "bz2", "xz"])
def test_a_damaged_compressed_archive_is_refused_as_damaged(tmp_path, kind):
    """A .tar.gz, .tar.bz2 or .tar.xz cut short or corrupted on its way to the device is
    refused as a damaged .tar is (exit 2, one line): tarfile passes its decompressors' errors
    on as they are (EOFError, zlib.error, LZMAError, bz2's OSError "Invalid data stream"),
    which were a traceback or an exit 1 that called a bad archive an I/O error."""
    import bz2
    import gzip
    import lzma

    from exporter.report import check_archive_replaceable

    text = "".join(f"turn on the lights in room {i} at {i * 7 % 24}:00\n" for i in range(80_000))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:   # big enough for several bz2 blocks
        for name, data in (("b/notes.txt", text.encode()), ("b/manifest.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    compress = {"gz": lambda data: gzip.compress(data, mtime=0), "bz2": bz2.compress,
                "xz": lzma.compress}[kind]
    packed = compress(raw.getvalue())
    corrupted = bytearray(packed)
    corrupted[len(packed) // 10 if kind == "gz" else len(packed) // 2] ^= 0xFF
    into = tmp_path / "models"
    for name, data in (("cut", packed[:len(packed) // 2]), ("early", packed[:100]),
                       ("corrupted", bytes(corrupted))):
        archive = tmp_path / f"{name}.tar.{kind}"
        archive.write_bytes(data)
        damaged = rf"{name}.tar.{kind} is damaged \(.+\); copy it again"
        with pytest.raises(BundleError, match=damaged if name != "early" else
                           rf"{damaged}|is not a tar archive"):   # (bz2: one block read)
            runtime.unpack(archive, into)
        assert not into.exists() or not list(into.iterdir())
        with pytest.raises(FileNotFoundError):   # a file, not a bundle directory
            runtime.load(archive)
        with pytest.raises(FileExistsError, match="is not an archive of bundle"):
            check_archive_replaceable(archive, "b")   # the exporter's --tar leaves it be
    done = subprocess.run([sys.executable, "-m", "runtime", "unpack",
                           str(tmp_path / f"cut.tar.{kind}"), str(into)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "is damaged" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_manifest_json_cannot_parse_is_refused_as_not_valid_json(minilm_bundle, tmp_path):
    """Arrays nested deeper than Python recurses, or a number of more digits than int()
    takes, are no JSON the runtime can read: refused as any broken manifest.json is (they
    were a RecursionError or a bare ValueError: a traceback from python -m runtime verify),
    and an install holding one is replaced by unpack as a damaged one is."""
    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    into = tmp_path / "models"
    installed = runtime.unpack(archive, into)
    good = (installed / "manifest.json").read_bytes()
    unreadable = [b"[" * 100_000 + b"]" * 100_000,
                  re.sub(rb'"opset": \d+', b'"opset": ' + b"1" * 5000, good, count=1)]

    assert installed == into / "minilm-arm-cpu" and unreadable[1] != good
    for text in unreadable:
        with pytest.raises(BundleError, match=r"bad\.tar: minilm-arm-cpu/manifest\.json is "
                                              r"not valid JSON"):
            runtime.unpack(_repacked(archive, tmp_path / "bad.tar", manifest=text), into)
        assert (installed / "manifest.json").read_bytes() == good
        (installed / "manifest.json").write_bytes(text)   # a damaged install
        with pytest.raises(BundleError, match=r"manifest\.json is not valid JSON"):
            runtime.Bundle.open(installed)
        done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(installed)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "is not valid JSON" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert runtime.unpack(archive, into) == installed   # replaced
        assert (installed / "manifest.json").read_bytes() == good


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX's")
def test_an_archive_on_a_pipe_is_not_said_to_be_missing(tmp_path):
    """`python -m runtime unpack <(curl ...) /opt/models` hands unpack a pipe, which it cannot
    read twice (checked, then copied): it said the archive did not exist."""
    fifo = tmp_path / "bundle.tar"
    os.mkfifo(fifo)
    for path in (fifo, Path(os.devnull)):
        with pytest.raises(FileNotFoundError, match="is not a regular file .*save the archive "
                                                    "to a file"):
            runtime.unpack(path, tmp_path / "models")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runtime.unpack(tmp_path / "missing.tar", tmp_path / "models")
    assert not (tmp_path / "models").exists()


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="names are bytes on Linux")
def test_unpack_into_a_directory_named_in_another_encoding_is_refused_in_words(minilm_bundle,
                                                                               tmp_path):
    """onnxruntime opens only UTF-8 paths, so a bundle in a directory named in Latin-1
    (b"mod\xe8les") cannot load: unpack, which loads what it installs, refuses it in one
    line (exit 2) and leaves nothing there, rather than install a bundle no load can open."""
    into = tmp_path / os.fsdecode(b"mod\xe8les")
    done = subprocess.run([sys.executable, "-m", "runtime", "unpack",
                           str(minilm_bundle.with_name("minilm-arm-cpu.tar")), str(into)],
                          cwd=REPO, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 2 and done.stdout == b"", done.stderr
    assert b"onnxruntime opens only paths that are UTF-8" in done.stderr
    assert b"Traceback" not in done.stderr
    assert not into.exists()   # refused before the copy (it copied and hashed all 24 MB)


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="names are bytes on Linux")
def test_a_graph_in_a_directory_named_in_another_encoding_is_refused_in_words(tmp_path):
    """onnxruntime takes a path as UTF-8 text: one in a directory named in Latin-1 failed
    with pybind11's "incompatible constructor arguments" and the signatures of
    InferenceSession, over several lines (what runtime.load and verify then said)."""
    import onnx
    from onnx import TensorProto, helper

    from runtime.model import ort_session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for name, works in ((b"mod\xc3\xa8les", True), (b"mod\xe8les", False)):   # UTF-8, Latin-1
        directory = tmp_path / os.fsdecode(name)
        directory.mkdir()
        onnx.save(model, directory / "model.onnx")
        if works:
            assert ort_session(directory / "model.onnx").get_inputs()[0].name == "x"
            continue
        with pytest.raises(ValueError, match="onnxruntime opens only paths that are UTF-8, "
                                             "and .* is not"):
            ort_session(directory / "model.onnx")


def test_unpack_names_the_file_that_keeps_it_from_replacing_an_install(minilm_bundle, tmp_path):
    """An install that also holds a file its manifest does not list (the application's notes,
    a cache) loads and verifies, and unpack, rightly, does not delete that file; but it said
    the directory "is not a bundle", which verify contradicts. It names the file."""
    into = tmp_path / "models"
    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    installed = runtime.unpack(archive, into)
    (installed / "cache").mkdir()
    (installed / "cache" / "notes.txt").write_text("mine")
    runtime.load(installed)
    with pytest.raises(FileExistsError, match="is a bundle that also holds 'cache/notes.txt', "
                                              "which neither its manifest.json nor the "
                                              "archive's lists; refusing to delete it"):
        runtime.unpack(archive, into)
    assert (installed / "cache" / "notes.txt").read_text() == "mine"
    (installed / "manifest.json").unlink()   # no bundle at all: as before
    with pytest.raises(FileExistsError, match="exists and is not a bundle"):
        runtime.unpack(archive, into)
    # A folder of the user's whose files merely have a bundle's names, no manifest.json:
    # they were deleted and the bundle put in their place.
    shutil.rmtree(installed)
    installed.mkdir()
    (installed / "model.onnx").write_text("my own model")
    (installed / "tokenizer.json").write_text("my own tokenizer")
    with pytest.raises(FileExistsError, match="exists and is not a bundle"):
        runtime.unpack(archive, into)
    assert (installed / "model.onnx").read_text() == "my own model"
    assert sorted(p.name for p in installed.iterdir()) == ["model.onnx", "tokenizer.json"]
    # an empty directory is replaced, as the exporter's --output replaces one (a device
    # image that made /opt/models/<bundle> in advance failed every unpack)
    shutil.rmtree(installed)
    installed.mkdir()
    assert runtime.unpack(archive, into) == installed and runtime.load(installed)


def test_a_refused_unpack_leaves_no_directory_it_made_and_names_a_file_on_the_way(
        minilm_bundle, tmp_path):
    """A byte flipped in the archive's model.onnx is refused after the copy, which left the
    directories z/a/b it had made; unpack into a file said "[Errno 17] File exists"."""
    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        member = tar.getmember("minilm-arm-cpu/model.onnx")
    data[member.offset_data + member.size // 2] ^= 0xFF
    flipped = tmp_path / "flip.tar"
    flipped.write_bytes(data)
    with pytest.raises(BundleError, match="sha256"):
        runtime.unpack(flipped, tmp_path / "z" / "a" / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flip.tar"]
    (tmp_path / "afile").write_text("x")
    for into in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(NotADirectoryError, match=r"afile' exists and is not a directory; "
                                                     r"unpack into a directory"):
            runtime.unpack(archive, into)
    assert (tmp_path / "afile").read_text() == "x"
    assert runtime.unpack(archive, tmp_path / "z" / "a") == tmp_path / "z" / "a" / archive.stem


def test_a_stop_that_an_import_turns_into_another_error_still_exits_128_plus_n(monkeypatch,
                                                                                capsys):
    """SIGTERM while onnxruntime's native module starts: the import turned the handler's
    SystemExit into an ImportError, and the updater saw exit 1 (an I/O error) and a
    traceback."""
    import runtime.__main__ as cli

    def stopped_in_an_import(archive, into, signed_by=None):
        try:
            cli._stop(signal.SIGTERM, None)
        except SystemExit as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(cli, "unpack", stopped_in_an_import)
    monkeypatch.setattr(cli, "_stopped_by", 0)
    assert cli._run(["unpack", "a.tar", "models"]) == 128 + signal.SIGTERM
    monkeypatch.setattr(cli, "_stopped_by", 0)
    monkeypatch.setattr(cli, "unpack", lambda archive, into, signed_by=None: "models/m")
    assert cli._run(["unpack", "a.tar", "models"]) == 0
    assert capsys.readouterr().out == "models/m\n"


def test_device_commands_unpack_and_verify(minilm_bundle, tmp_path):
    """python -m runtime unpack / verify, for an updater's shell script: one line and exit 0,
    or the reason and exit 2."""
    def run(*args):
        done = subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout.strip(), done.stderr.strip()

    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    assert run("unpack", archive, tmp_path / "models") == (
        0, str(tmp_path / "models" / "minilm-arm-cpu"), "")
    code, out, _ = run("verify", tmp_path / "models" / "minilm-arm-cpu")
    assert code == 0 and "minilm-arm-cpu (feature-extraction, target arm-cpu)" in out
    assert "sha256 verified" in out
    (tmp_path / "models" / "minilm-arm-cpu" / "tokenizer.json").write_text("{}")
    code, _, err = run("verify", tmp_path / "models" / "minilm-arm-cpu")
    assert code == 2 and "tokenizer.json" in err
    assert run("verify", archive)[0] == 2 and "runtime.unpack" in run("verify", archive)[2]
    assert run("unpack", tmp_path / "missing.tar", tmp_path)[0] == 2
    manifest = json.loads((minilm_bundle / "manifest.json").read_text())
    bad = _repacked(archive, tmp_path / "bad.tar", manifest=manifest | {"files": 5})
    code, _, err = run("unpack", bad, tmp_path / "models")
    assert code == 2 and "field 'files' must be list" in err and "Traceback" not in err
    # what load refuses beyond the files, verify refuses too (it passed batch_size 0)
    shutil.rmtree(tmp_path / "models")
    run("unpack", archive, tmp_path / "models")
    installed = tmp_path / "models" / "minilm-arm-cpu"
    manifest = json.loads((installed / "manifest.json").read_text())
    manifest["target"]["runtime"]["batch_size"] = 0
    (installed / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run("verify", installed)
    assert code == 2 and "batch_size must be a positive int" in err
    (tmp_path / "a-file").write_text("x")   # a path through a file: bad input, not I/O
    assert run("unpack", archive, tmp_path / "a-file" / "sub")[0] == 2


def test_device_unpack_refuses_what_would_leave_a_bundle_it_cannot_update(minilm_bundle,
                                                                          tmp_path):
    """Into a bundle (the new one nested in the old: verify passed, every later unpack was
    refused), into "" (an unset $DEST: the current directory), or a name longer than the
    system takes (exit 1, an I/O error): exit 2, nothing written. A reader that closed the
    output early does not undo an install; SIGTERM stops one with its work removed."""
    def run(*args, **options):
        done = subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, **options)
        return done.returncode, done.stdout.strip(), done.stderr.strip()

    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    installed = tmp_path / "models" / "minilm-arm-cpu"
    assert run("unpack", archive, tmp_path / "models")[0] == 0
    code, _, err = run("unpack", archive, installed)
    assert code == 2 and f"lies inside the bundle {str(installed)!r}" in err, err
    assert run("unpack", archive, installed / "sub")[0] == 2
    assert run("verify", installed)[0] == 0
    code, _, err = run("unpack", archive, "")
    assert (code, err) == (2, "error: Directory '' is empty; name where the bundle goes ('.' "
                              "for the current directory).")
    for args in (("unpack", archive, "x" * 300), ("unpack", "x" * 300 + ".tar", "models"),
                 ("verify", "x" * 300)):
        code, _, err = run(*args)
        assert code == 2 and "File name too long" in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["minilm-arm-cpu"]
    # stdout closed before the line is printed: the install stands, exit 0, no error
    done = subprocess.Popen([sys.executable, "-m", "runtime", "unpack", str(archive),
                             str(tmp_path / "models")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    done.stdout.close()   # long before the install ends and its line is printed
    assert done.wait(timeout=120) == 0 and done.stderr.read() == ""
    # SIGTERM in the middle (files unpacked, not yet renamed in): 143, no work left behind
    stop = ("import os, runpy, signal, runtime.bundle as b\n"
            "b.sync_tree = lambda path: os.kill(os.getpid(), signal.SIGTERM)\n"
            "runpy.run_module('runtime', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", stop, "unpack", str(archive),
                           str(tmp_path / "new")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 143, done.stderr
    assert not (tmp_path / "new").exists()   # made for it, and gone with its work


def test_device_unpack_onto_a_read_only_file_system_is_refused_as_without_permission(
        minilm_bundle, tmp_path, monkeypatch, capsys):
    """A read-only file system (EROFS: an OSError, not a PermissionError) exited 1, "the
    machine failed", naming a hidden work directory; no permission exited 2."""
    import errno

    from runtime import __main__ as cli
    from runtime import bundle

    archive = minilm_bundle.with_name("minilm-arm-cpu.tar")
    into = tmp_path / "models"
    installed = runtime.unpack(archive, into)
    for number, why in ((errno.EROFS, f"{str(into)!r} is on a read-only file system"),
                        (errno.EACCES, f"no permission to create files in {str(into)!r}")):
        def refuse(target, number=number):
            raise OSError(number, os.strerror(number),
                          str(target.parent / f".{target.name}.1.abcdefgh"))

        monkeypatch.setattr(bundle, "work_dir_beside", refuse)
        assert cli.main(["unpack", str(archive), str(into)]) == 2
        assert capsys.readouterr().err == (f"error: Cannot unpack into {str(into)!r}: {why}. "
                                           f"Unpack into another directory.\n")
        runtime.load(installed)   # the install it would have replaced is untouched
    monkeypatch.undo()

    def remounted(path):   # read-only after a disk error, while the copy is written
        raise OSError(errno.EROFS, "Read-only file system", str(path / "model.onnx"))

    monkeypatch.setattr(bundle, "sync_tree", remounted)
    assert cli.main(["unpack", str(archive), str(into)]) == 2
    assert "Read-only file system" in capsys.readouterr().err
    runtime.load(installed)
    assert sorted(p.name for p in into.iterdir()) == ["minilm-arm-cpu"]


def test_odd_and_long_text(minilm_bundle):
    model = runtime.load(minilm_bundle)
    long_text = " ".join(["lights"] * 10_000)
    odd = ["", "   ", "\x00\x01 turn on", "💡👨‍👩‍👧 on", "שלום lights", "e\u0301te\u0301",
           "ﬁ" * 300, "a" * 5000, long_text]
    out = model.embed(odd)
    assert out.shape == (len(odd), 384) and np.isfinite(out).all()
    assert len(model.tokenizer.encode(long_text, max_length=model.max_length)) == 128


def test_a_long_list_is_embedded_in_memory_that_follows_batch_size(minilm_bundle):
    # embed() tokenized and padded the whole list before the first batch ran: 100k texts of
    # 128 tokens held ~0.6 GB of ids and feeds besides the embeddings themselves.
    import tracemalloc

    model = runtime.load(minilm_bundle)
    real = model.session

    class Session:   # the graph's output for any batch, fast: what is measured is _run's
        def run(self, names, feeds):
            return [np.ones((*feeds["input_ids"].shape, 384), np.float32)]

        def __getattr__(self, name):
            return getattr(real, name)

    model.session = Session()
    texts = [f"{i} " + "turn on the kitchen lights and close the blinds " * 20
             for i in range(20_000)]   # 128 tokens each, once truncated
    tracemalloc.start()
    try:
        out = model.embed(texts, batch_size=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (20_000, 384)
    assert peak - out.nbytes < 16 << 20, f"{(peak - out.nbytes) >> 20} MB besides the output"
    # the same rows, in order, as small calls give
    model.session = real
    some = texts[:70] + texts[-3:]
    np.testing.assert_allclose(model.embed(some, batch_size=16),
                               np.concatenate([model.embed([t]) for t in some]), atol=1e-5)


def test_texts_cut_to_max_length_are_said_once(minilm_bundle):
    """The bundle's max_length (the profile's 128) is below MiniLM's own 256: a paragraph
    was cut, silently, and its vector differed from sentence-transformers' (cosine 0.66)."""
    import warnings

    model = runtime.load(minilm_bundle)
    fits = "x " * 126   # 126 ids + [CLS] + [SEP]: 128, the limit, not past it
    assert len(model.tokenizer.encode(fits)) == model.max_length == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.embed([fits, "lights on"])
    with pytest.warns(RuntimeWarning, match=r"^2 text\(s\) longer than this bundle's "
                                            r"max_length of 128 tokens were cut to it \(the "
                                            r"first: item 1\); the model itself takes up to "
                                            r"256: export with a profile whose \[runtime\] "
                                            r"max_sequence_length is higher") as caught:
        model.embed(["lights on", fits + "y", "lights off", "word " * 300])
    assert caught[0].filename == __file__   # the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once per loaded model
        model.embed(["word " * 300])


def test_bad_input_types(minilm_bundle):
    model = runtime.load(minilm_bundle)
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        model.embed("turn on the lights")
    with pytest.raises(TypeError, match="item 1 is bytes"):
        model.embed(["ok", b"bytes"])
    with pytest.raises(TypeError, match="Pass a list of strings, not NoneType"):
        model.embed(None)
    # a set came back in its own order, a dict as its keys: rows the caller cannot place
    with pytest.raises(TypeError, match=r"not a set: .* e\.g\. sorted\(texts\)"):
        model.embed({"lights on", "lights off"})
    with pytest.raises(TypeError, match=r"not a dict: its keys would be run"):
        model.embed({"lights on": 1})
    # bytes were iterated: "item 0 is int"; None got a hint about decoding bytes
    with pytest.raises(TypeError, match="not bytes; decode bytes first"):
        model.embed(b"turn on the lights")
    with pytest.raises(TypeError, match="got bytes; decode bytes first"):
        model.tokenizer.encode_batch(b"ab")
    with pytest.raises(TypeError, match=r"^encode\(\) expects str, got NoneType\.$"):
        model.tokenizer.encode(None)
    with pytest.raises(TypeError, match="got bytes; decode bytes first"):
        model.tokenizer.encode(b"ab")
    # a batch size that cannot be used is an error, not an empty or default result
    for bad, error, message in [(0, ValueError, "batch_size must be >= 1, got 0"),
                                (-1, ValueError, "batch_size must be >= 1, got -1"),
                                (1.5, TypeError, "batch_size must be an int, got 1.5"),
                                (True, TypeError, "batch_size must be an int, got True")]:
        with pytest.raises(error, match=message):
            model.embed(["turn on the lights"], batch_size=bad)
    assert model.embed(["a", "b", "c"], batch_size=np.int64(2)).shape == (3, 384)


def test_bad_load_options_are_refused(minilm_bundle):
    for options, error, message in [
        ({"threads": -1}, ValueError, "threads must be >= 0, got -1"),
        ({"threads": "2"}, TypeError, "threads must be an int, got '2'"),
        ({"providers": "CPUExecutionProvider"}, TypeError, "must be a list of onnxruntime"),
        ({"providers": []}, ValueError, "providers is empty"),
        ({"providers": ["CpuExecutionProvider"]}, ValueError,
         "Unknown execution provider 'CpuExecutionProvider' in providers; onnxruntime's are: .*"
         "CPUExecutionProvider"),
        ({"pipeline": "processes"}, ValueError, "pipeline must be 'threads' or 'ray'"),
        ({"spinning": "no"}, TypeError, "spinning must be True or False, got 'no'"),  # was on
    ]:
        with pytest.raises(error, match=message):
            runtime.load(minilm_bundle, **options)


def test_a_closed_model_says_so(minilm_bundle):
    with runtime.load(minilm_bundle) as model:
        first = model.embed(["turn on the lights"])
    for call in (lambda: model.embed(["turn on the lights"]), lambda: model.dim):
        with pytest.raises(ValueError, match="is closed .*load the bundle again"):
            call()
    model.close()   # twice is fine
    np.testing.assert_array_equal(runtime.load(minilm_bundle).embed(["turn on the lights"]),
                                  first)


def test_missing_provider_falls_back_with_a_warning(minilm_bundle):
    import onnxruntime as ort

    missing = next(p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                               "MIGraphXExecutionProvider")
                   if p not in ort.get_available_providers())
    with pytest.warns(RuntimeWarning, match=f"{missing} not in this onnxruntime build .*; "
                                            f"running on CPUExecutionProvider"):
        model = runtime.load(minilm_bundle, providers=[missing, "CPUExecutionProvider"])
    assert model.session.get_providers()[0] == "CPUExecutionProvider"
    assert model.embed(["lock the door"]).shape == (1, 384)


def test_tampered_file_is_refused(bundle_copy):
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx: sha256 does not match"):
        runtime.load(bundle_copy)


def test_truncated_file_is_refused(bundle_copy):
    data = (bundle_copy / "tokenizer.json").read_bytes()
    (bundle_copy / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"tokenizer.json: \d+ bytes, manifest.json says \d+"):
        runtime.load(bundle_copy)


def test_missing_file_and_manifest(bundle_copy, tmp_path):
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx: listed in manifest.json but missing"):
        runtime.load(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="has no manifest.json"):
        runtime.load(bundle_copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runtime.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer.json' is a file; a bundle is the "
                                                "directory that holds manifest.json"):
        runtime.load(bundle_copy / "tokenizer.json")
    # a device, and "" (which Path reads as the current directory)
    with pytest.raises(FileNotFoundError, match="'/dev/null' is not a directory; a bundle is"):
        runtime.load("/dev/null")
    with pytest.raises(FileNotFoundError, match="Bundle directory '' is empty"):
        runtime.load("")


def test_a_file_the_manifest_does_not_vouch_for_is_never_loaded(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    listed = manifest["files"]
    # model.onnx swapped and dropped from the list: verification would pass without it
    model = (bundle_copy / "model.onnx").read_bytes()
    shutil.copy(bundle_copy / "tokenizer.json", bundle_copy / "model.onnx")
    for verify in (True, False):
        edit_manifest(bundle_copy, files=[f for f in listed if f["path"] != "model.onnx"])
        with pytest.raises(BundleError, match="'model.onnx' is not in its 'files' list"):
            runtime.load(bundle_copy, verify=verify)
    (bundle_copy / "model.onnx").write_bytes(model)
    for verify in (True, False):
        edit_manifest(bundle_copy, files=listed, model_file="../outside.onnx")
        with pytest.raises(BundleError, match="'../outside.onnx' is not in its 'files' list"):
            runtime.load(bundle_copy, verify=verify)
        for entry in ({"path": "/etc/hostname", "bytes": 1, "sha256": "0"},
                      {"path": "a/../../x", "bytes": 1, "sha256": "0"}):
            edit_manifest(bundle_copy, files=[*listed, entry], model_file="model.onnx")
            with pytest.raises(BundleError, match="lists an unsafe file path"):
                runtime.load(bundle_copy, verify=verify)
        edit_manifest(bundle_copy, files=[*listed, "model.onnx"])
        with pytest.raises(BundleError, match=rf"files\[{len(listed)}\] must be "
                                              r"\{\"path\": str"):
            runtime.load(bundle_copy, verify=verify)


def test_ray_asked_of_a_single_graph_says_it_runs_here(minilm_bundle):
    with pytest.warns(RuntimeWarning, match="is one graph, so it runs in this process"):
        model = runtime.load(minilm_bundle, pipeline="ray")
    assert model.embed(["lights on"]).shape == (1, 384)


def test_a_graph_reading_weights_from_a_file_the_manifest_does_not_list_is_refused(
        bundle_copy, minilm_bundle):
    """verify passed such a bundle ("sha256 verified") and load ran it: 1M floats reversed in
    the unlisted file gave embeddings at cosine 0.096 to the real ones."""
    import onnx

    from runtime.bundle import sha256_of

    graph = onnx.load(bundle_copy / "model.onnx")
    onnx.save_model(graph, bundle_copy / "model.onnx", save_as_external_data=True,
                    location="weights.bin", size_threshold=1024)
    manifest = rehashed(bundle_copy, "model.onnx")
    with pytest.raises(BundleError, match="model.onnx: its weights are read from 'weights.bin', "
                                          "which manifest.json does not list"):
        runtime.load(bundle_copy)
    weights = bundle_copy / "weights.bin"
    edit_manifest(bundle_copy, files=[*manifest["files"], {
        "path": "weights.bin", "bytes": weights.stat().st_size, "sha256": sha256_of(weights)}])
    model = runtime.load(bundle_copy)   # listed, so verified: the same model
    expected = runtime.load(minilm_bundle).embed(["lights on"])
    np.testing.assert_array_equal(model.embed(["lights on"]), expected)


def test_an_encoder_graph_with_inputs_the_runtime_cannot_feed_is_refused_at_load(bundle_copy):
    """A graph taking position_ids loaded and passed verify, then every embed() died on an
    `assert` in pad_batch (skipped under python -O: onnxruntime's error instead)."""
    import onnx
    from onnx import TensorProto, helper

    graph = onnx.load(bundle_copy / "model.onnx")
    graph.graph.input.append(helper.make_tensor_value_info(
        "position_ids", TensorProto.INT64, ["batch", "sequence"]))
    onnx.save(graph, bundle_copy / "model.onnx")
    rehashed(bundle_copy, "model.onnx")
    with pytest.raises(BundleError, match=r"the graph has inputs \['position_ids'\], which "
                                          r"the runtime has no feed for"):
        runtime.load(bundle_copy)


def test_a_missing_file_is_refused_even_unverified(bundle_copy):
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx: listed in manifest.json but missing"):
        runtime.load(bundle_copy, verify=False)


def test_odd_manifest_values_are_refused_naming_the_field(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    target, pooling = manifest["target"], manifest["pooling"]
    for changes, message in [
        ({"files": [*manifest["files"], {"path": "a\0b", "bytes": 1, "sha256": "0"}]},
         "unsafe file path"),
        ({"files": [manifest["files"][0] | {"bytes": True}]}, r"files\[0\] must be"),
        ({"files": [manifest["files"][0] | {"bytes": -1}]}, r"files\[0\] must be"),
        ({"target": target | {"runtime": None}}, "target.runtime must be an object"),
        ({"target": target | {"runtime": target["runtime"] | {"batch_size": 0}}},
         "target.runtime.batch_size must be a positive int, got 0"),
        ({"max_length": None}, r"max_length \(or target.runtime.max_sequence_length\) must"),
        ({"pooling": {"mode": "mean"}}, "pooling must be"),
        ({"pooling": pooling | {"mode": "median"}}, "pooling must be"),
        ({"pooling": pooling | {"prompts": ["query: "]}}, "pooling.prompts must map"),
        ({"task": "foo"}, "task 'foo' is not one this runtime runs"),
        ({"task": "text-generation"}, "the graph is not a decoder"),
        ({"target": target | {"runtime": target["runtime"] | {"threads": -1}}},
         "target.runtime.threads must be >= 0"),
        ({"target": target | {"runtime": target["runtime"] | {"threads": "2"}}},
         "target.runtime.threads must be an int"),
        # 10,000 spinning threads stalled the process on 2 cores
        ({"target": target | {"runtime": target["runtime"] | {"threads": 10_000}}},
         "target.runtime.threads is 10000; a session takes 0 .onnxruntime picks. to 1024"),
        ({"target": target | {"runtime": target["runtime"] | {"execution_providers": ["Foo"]}}},
         "Unknown execution provider 'Foo' in target.runtime.execution_providers"),
        ({"target": target | {"runtime": target["runtime"] | {
            "execution_providers": "CPUExecutionProvider"}}},
         "target.runtime.execution_providers must be a list"),
    ]:
        edit_manifest(bundle_copy, **manifest | changes)
        with pytest.raises(BundleError, match=message):
            runtime.load(bundle_copy, verify=False)
    edit_manifest(bundle_copy, **manifest | {"pooling": None})   # null: mean, normalized
    assert runtime.load(bundle_copy, verify=False).embed(["hi"]).shape == (1, 384)
    for threads in (2**31, 2**31 - 1, 1025):   # 2**31 - 1: std::bad_alloc in onnxruntime
        with pytest.raises(ValueError, match=f"threads is {threads}; a session takes 0"):
            runtime.load(bundle_copy, verify=False, threads=threads)


def test_manifest_fields_every_call_reads_are_checked_at_load(bundle_copy):
    """What embed() reads from the manifest is refused at load (and so by verify, exit 2 in
    one line), not accepted there to fail every call after: a max_length with no room for
    the special tokens or past the graph's positions, a default prompt that names none of
    the prompts. A stage plan without the top-level "inputs" list runs on its first stage's
    (it was a KeyError traceback), and a model_file that is not a name is refused naming
    it."""
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    pooling = manifest["pooling"]
    for changes, message in [
        ({"max_length": 1}, "max_length 1 is too short for this tokenizer"),
        # MiniLM embeds 512 positions: 600 failed in onnxruntime's Add at the first long text
        ({"max_length": 600}, r"max_length .or target.runtime.max_sequence_length. is 600, "
                              r"but the graph embeds 512 token positions .model.positions."),
        ({"pooling": pooling | {"prompts": {"query": "query: "}, "default_prompt": "passage"}},
         "pooling.default_prompt must name one of pooling.prompts"),
        ({"model_file": ["model.onnx"]}, r"\['model.onnx'\] is not in its 'files' list"),
    ]:
        edit_manifest(bundle_copy, **manifest | changes)
        with pytest.raises(BundleError, match=message):
            runtime.load(bundle_copy, verify=False)
        done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(bundle_copy)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "\n" not in done.stderr.strip(), done.stderr
    staged = {k: v for k, v in manifest.items() if k not in ("inputs", "model_file")}
    (bundle_copy / "manifest.json").write_text(json.dumps(staged | {"stages": [
        {"file": "model.onnx", "device": "cpu", "inputs": manifest["inputs"],
         "outputs": manifest["outputs"]}]}))
    assert runtime.load(bundle_copy, verify=False).embed(["hi"]).shape == (1, 384)
    # a stage plan's outputs without names, a file path no filesystem can name: refused
    # (they were a KeyError and a UnicodeEncodeError traceback, verify's exit 1)
    files = manifest["files"] + [{"path": "\ud800x", "bytes": 1, "sha256": "0" * 64}]
    for changes, message in [({"outputs": [{}]}, r"'outputs' must be a list of \{\"name\""),
                             ({"files": files}, "unsafe file path")]:
        edit_manifest(bundle_copy, **changes)
        with pytest.raises(BundleError, match=message):
            runtime.load(bundle_copy, verify=False)
        done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(bundle_copy)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "\n" not in done.stderr.strip(), done.stderr
        edit_manifest(bundle_copy, **staged)


def test_a_load_refused_after_its_session_opened_closes_it(bundle_copy, monkeypatch):
    """What a session holds (a Ray pipeline: a GPU per stage, in a placement group) goes back
    when the load is refused after it opened, or when a load starts again because the bundle
    was replaced meanwhile; not when the garbage collector gets to it."""
    from runtime._files import replace_directory
    from runtime.model import Model

    real, closed = Model._session, []

    class Held:   # stands in for RayStagedSession
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def close(self):
            closed.append(self.session)

    monkeypatch.setattr(Model, "_session", staticmethod(lambda *a: Held(real(*a))))
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    edit_manifest(bundle_copy, pooling=manifest["pooling"] | {
        "prompts": {"query": "query: "}, "default_prompt": "passage"})
    with pytest.raises(BundleError, match="pooling.default_prompt must name one of"):
        runtime.load(bundle_copy, verify=False)
    assert len(closed) == 1
    edit_manifest(bundle_copy, pooling=manifest["pooling"])
    new = Path(shutil.copytree(bundle_copy, bundle_copy.with_name(".bundle.new")))
    swapped = []
    real_init = Model.__init__

    def init(self, *args, **kwargs):   # the bundle is swapped once the first Model is built
        real_init(self, *args, **kwargs)
        if not swapped:
            swapped.append(self.session)
            replace_directory(new, bundle_copy)

    monkeypatch.setattr(Model, "__init__", init)
    model = runtime.load(bundle_copy, verify=False)
    assert len(closed) == 2 and closed[1] is swapped[0].session is not model.session.session
    assert model.embed(["hi"]).shape == (1, 384)


def test_only_onnxruntimes_errors_become_a_bad_bundle(minilm_bundle, monkeypatch):
    """Ray missing (an ImportError with its install hint) or memory running out is not the
    bundle's fault: they pass as they are, not as "onnxruntime cannot load its graph"."""
    from runtime.model import Model

    for error in (ImportError("pipeline='ray' needs Ray: pip install 'edge-exporter[ray]'."),
                  MemoryError()):
        def session(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(Model, "_session", staticmethod(session))
        with pytest.raises(type(error)) as raised:
            runtime.load(minilm_bundle, verify=False)
        assert not isinstance(raised.value, BundleError)


def test_a_listed_file_that_is_a_directory_is_said_to_be_one(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").mkdir()
    with pytest.raises(BundleError, match="tokenizer.json: listed in manifest.json but a "
                                          "directory"):
        runtime.load(bundle_copy)


def test_the_log_setting_is_refused_in_one_line_and_empty_is_unset(minilm_bundle,
                                                                   monkeypatch, capsys):
    """EDGE_ORT_LOG=bogus made `python -m runtime verify` exit 1 (an I/O error, to an
    updater) with a traceback; set but empty it was refused where EDGE_Q4_ISA's is unset."""
    from runtime.__main__ import main as runtime_main

    monkeypatch.setenv("EDGE_ORT_LOG", "bogus")
    assert runtime_main(["verify", str(minilm_bundle)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: The environment variable EDGE_ORT_LOG is 'bogus'; it takes "
                           "verbose, info, warning, error, fatal (unset: error).")
    for value in ("", "WARNING"):
        monkeypatch.setenv("EDGE_ORT_LOG", value)
        assert runtime_main(["verify", str(minilm_bundle)]) == 0


def test_verify_refuses_what_load_refuses_in_one_line(bundle_copy):
    """Settings the one-thread CPU load of verify overrides, a graph onnxruntime cannot load
    and a tokenizer the runtime cannot read: exit 2 and one line, like every bad bundle
    (the last two were an exit-1 traceback: onnxruntime's errors are no RuntimeError)."""
    import onnx

    def verify():
        done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(bundle_copy)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stderr.strip()

    def relist(name):   # the file's new sha256 and size in the manifest: only its content is bad
        import hashlib

        manifest = json.loads((bundle_copy / "manifest.json").read_text())
        data = (bundle_copy / name).read_bytes()
        for entry in manifest["files"]:
            if entry["path"] == name:
                entry |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (bundle_copy / "manifest.json").write_text(json.dumps(manifest))

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    runtime_settings = manifest["target"]["runtime"]
    edit_manifest(bundle_copy, target=manifest["target"] | {
        "runtime": runtime_settings | {"execution_providers": ["FooEP"]}})
    code, err = verify()
    assert code == 2 and "Unknown execution provider 'FooEP'" in err and "\n" not in err
    edit_manifest(bundle_copy, target=manifest["target"])

    tokenizer = json.loads((bundle_copy / "tokenizer.json").read_text())
    (bundle_copy / "tokenizer.json").write_text(json.dumps(tokenizer | {
        "model": tokenizer["model"] | {"type": "WordLevel"}}))
    relist("tokenizer.json")
    code, err = verify()
    assert code == 2 and "unsupported model.type 'WordLevel'" in err and "\n" not in err
    with pytest.raises(BundleError, match="WordLevel"):
        runtime.load(bundle_copy)
    (bundle_copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    relist("tokenizer.json")

    graph = onnx.load(bundle_copy / "model.onnx")
    graph.graph.node[0].domain = "com.example"
    graph.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(graph, bundle_copy / "model.onnx")
    relist("model.onnx")
    code, err = verify()
    assert code == 2 and "onnxruntime cannot load its graph" in err and "\n" not in err
    with pytest.raises(BundleError, match="onnxruntime cannot load its graph"):
        runtime.load(bundle_copy)


def test_the_installed_onnxruntime_is_asked_its_opset(bundle_copy):
    import onnxruntime

    from runtime.bundle import installed_max_opset, max_supported_opset

    have = installed_max_opset()
    assert have >= max_supported_opset(onnxruntime.__version__)
    edit_manifest(bundle_copy, opset=have)
    runtime.load(bundle_copy, verify=False)
    edit_manifest(bundle_copy, opset=have + 1)
    with pytest.raises(BundleError, match=f"needs ai.onnx opset {have + 1}, but onnxruntime"):
        runtime.load(bundle_copy, verify=False)


def test_a_gpu_build_of_onnxruntime_is_not_asked_for_its_kernels(monkeypatch):
    """Listing the kernels loads every provider library: onnxruntime-gpu 1.31.1 on an H200
    without TensorRT's libnvinfer crashed the process (SIGSEGV) there, and so runtime.load of
    any bundle did. Such a build's opset comes from the table."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    from runtime.bundle import installed_max_opset, max_supported_opset

    def crash():
        raise AssertionError("get_all_opkernel_def called in a build with CUDA")

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                 "CPUExecutionProvider"])
    monkeypatch.setattr(ort_c, "get_all_opkernel_def", crash)
    installed_max_opset.cache_clear()
    try:
        assert installed_max_opset() == max_supported_opset(onnxruntime.__version__)
    finally:
        installed_max_opset.cache_clear()


def test_the_opset_table_says_what_each_release_runs():
    """Rows read off each release's CPU wheel (the newest opset of its ai.onnx kernels);
    the installed release, if the table covers it, agrees with its own kernels."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    from runtime.bundle import ORT_MAX_OPSET, max_supported_opset

    assert [max_supported_opset(v) for v in ("1.16.3", "1.20.1", "1.21.1", "1.23.2",
                                             "1.24.4", "1.27.0", "1.31.1", "1.32.0")] \
        == [19, 21, 22, 23, 25, 26, 27, 28]
    release = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2])
    if release <= ORT_MAX_OPSET[-1][0]:
        kernels = ort_c.get_all_opkernel_def()
        assert max_supported_opset(onnxruntime.__version__) == max(
            k.version_range[0] for k in kernels if k.domain in ("", "ai.onnx"))


def test_a_provider_in_the_build_that_did_not_start_is_said(tmp_path, monkeypatch):
    """onnxruntime-gpu without CUDA's libraries or a GPU (or TensorRT without libnvinfer)
    logs an error and runs the graph on the next provider; nothing in the runtime said so,
    and the application believed it ran on the GPU."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    from runtime.model import ort_session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a CPU session says nothing
        ort_session(tmp_path / "model.onnx")
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider is in this onnxruntime "
                                            "build but did not start here .* model.onnx "
                                            "runs on CPUExecutionProvider"):
        session = ort_session(tmp_path / "model.onnx",
                              providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        runtime.load(bundle_copy)


def test_unknown_format_version(bundle_copy):
    edit_manifest(bundle_copy, format_version=99)
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        runtime.load(bundle_copy)


def test_opset_beyond_installed_onnxruntime(bundle_copy):
    edit_manifest(bundle_copy, opset=99)
    with pytest.raises(BundleError, match=r"needs ai.onnx opset 99, but onnxruntime"):
        runtime.load(bundle_copy)


def test_unsafe_file_path(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"].append({"path": "../outside", "sha256": "0", "bytes": 0})
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unsafe file path '../outside'"):
        runtime.load(bundle_copy)


def test_a_link_out_of_the_bundle_is_named_as_the_fault(bundle_copy, tmp_path):
    """tokenizer.json replaced by a link to a file outside was refused as "manifest.json
    lists an unsafe file path 'tokenizer.json'", which blamed a manifest that is fine."""
    outside = tmp_path / "elsewhere.json"
    shutil.copy(bundle_copy / "tokenizer.json", outside)
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleError, match=r"tokenizer\.json is a link that leads outside "
                                          r"the bundle; put the file itself there"):
        runtime.load(bundle_copy)
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to(bundle_copy / "report.md")   # inside: its
    with pytest.raises(BundleError, match="tokenizer.json"):                # sha256 decides
        runtime.load(bundle_copy)


def test_max_supported_opset_table():
    from runtime.bundle import max_supported_opset

    assert max_supported_opset("1.14.1") == 18
    assert max_supported_opset("1.18.0") == 21
    assert max_supported_opset("1.32.0") >= 21
    assert max_supported_opset("1.9.0") == 0


def test_import_runtime_stays_light():
    code = ("import sys, runtime; heavy = {'torch', 'transformers', 'optimum', 'tokenizers', "
            "'onnx', 'exporter'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_runtime_spinning_off_gives_the_same_result(minilm_bundle):
    a = runtime.load(minilm_bundle, spinning=False, threads=1, verify=False)
    b = runtime.load(minilm_bundle)
    np.testing.assert_allclose(a.embed(["open the blinds"]), b.embed(["open the blinds"]),
                               atol=1e-5)


def test_verify_must_be_a_bool(minilm_bundle):
    """verify="no" was true, and verify=0 turned the check off."""
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="verify must be True or False"):
            runtime.load(minilm_bundle, verify=bad)
    assert runtime.load(minilm_bundle, verify=True).embed(["hi"]).shape == (1, 384)


def test_device_application(minilm_bundle):
    out = subprocess.run([sys.executable, "samples/match_command.py", str(minilm_bundle),
                          "please switch on the kitchen light", "what's the capital of france",
                          "make sure the front door is locked"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    lines = out.stdout.splitlines()
    assert "-> light.kitchen.on" in lines[0]
    assert "-> no action" in lines[1]
    assert "ambiguous: lock.front_door." in lines[2]  # lock vs unlock: a near tie, not acted on
    # an option between the bundle and the utterances (they were "unrecognized arguments")
    between = subprocess.run([sys.executable, "samples/match_command.py", str(minilm_bundle),
                              "--threshold", "0.6", "shut the garage", "lock the front door"],
                             capture_output=True, text=True, check=True, cwd=REPO)
    assert len(between.stdout.splitlines()) == 2 and "'shut the garage' ->" in between.stdout
    for args, message in [(["--threshold", "2"], "--threshold must be from 0 to 1, got 2.0"),
                           (["--margin", "nan"], "--margin must be from 0 to 1, got nan")]:
        bad = subprocess.run([sys.executable, "samples/match_command.py", str(minilm_bundle),
                              *args], capture_output=True, text=True, cwd=REPO)
        assert bad.returncode == 2 and message in bad.stderr


def test_device_application_reads_stdin_where_told_and_compares_cosines(minilm_bundle,
                                                                         tmp_path):
    # '-' among other utterances is stdin's lines there (it was matched as the text "-"),
    # bytes that are not UTF-8 do not stop it, and a bundle that does not normalize its
    # embeddings is compared by cosine all the same (raw dot products acted on anything)
    unnormalized = Path(shutil.copytree(minilm_bundle, tmp_path / "raw"))
    edit_manifest(unnormalized, pooling=json.loads(
        (minilm_bundle / "manifest.json").read_text())["pooling"] | {"normalize": False})
    for bundle in (minilm_bundle, unnormalized):
        out = subprocess.run([sys.executable, "samples/match_command.py", str(bundle),
                              "please switch on the kitchen light", "-"],
                             input=b"what's the capital of france\n\xff open\n",
                             capture_output=True, check=True, cwd=REPO)
        lines = out.stdout.decode().splitlines()
        assert len(lines) == 3 and "-> light.kitchen.on (similarity 0." in lines[0]
        assert lines[1].startswith("\"what's the capital of france\" -> no action")
        assert lines[2].startswith("'\ufffd open' ->")
    # a closed pipe with nothing said: nothing to act on (it ran the demo's commands)
    quiet = subprocess.run([sys.executable, "samples/match_command.py", str(minilm_bundle), "-"],
                           input=b"\n  \n", capture_output=True, check=True, cwd=REPO)
    assert quiet.stdout == b""


def _sample(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "samples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sample", ["match_command", "intent"])
def test_device_applications_take_stdin_twice(sample, monkeypatch):
    # The first '-' closed stdin with its reader, and a second one (`- -`, or `- "lights on"
    # -`) stopped the application with "ValueError: I/O operation on closed file"; it now
    # reads on to stdin's end, as `cat - -` does.
    module = _sample(sample)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"lock the door\n\nhi\n")))
    assert list(module.batches(["a", "b", "-", "lights on", "-"])) == [
        ["a", "b"], ["lock the door"], ["hi"], ["lights on"]]
    assert not sys.stdin.buffer.closed


@pytest.mark.parametrize("sample", ["match_command", "intent"])
def test_device_applications_without_stdin_say_so(sample, monkeypatch, capsys):
    # started with stdin closed (`<&-`): '-' stopped it with "AttributeError: 'NoneType'
    # object has no attribute 'buffer'" after loading the bundle
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(SystemExit) as stop:
        _sample(sample).main(["no-bundle-needed", "-"])
    assert stop.value.code == 2
    assert "'-' reads utterances from stdin, and this process has none" in \
        capsys.readouterr().err


def test_device_application_answers_each_line_as_it_arrives(minilm_bundle):
    # A speech front end writes one utterance and waits for the answer: '-' read stdin to its
    # end before acting, so the answer came only when the pipe closed.
    import threading

    app = subprocess.Popen([sys.executable, "samples/match_command.py", str(minilm_bundle),
                            "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        answers: list[str] = []
        for said, command in [("please lock the front door", "lock.front_door."),
                              ("switch on the kitchen light", "light.kitchen.on")]:
            app.stdin.write(said + "\n")
            app.stdin.flush()   # and the pipe stays open
            reader = threading.Thread(target=lambda: answers.append(app.stdout.readline()))
            reader.start()
            reader.join(timeout=120)
            assert not reader.is_alive(), f"no answer to {said!r} while stdin is open"
            assert answers[-1].startswith(repr(said)) and command in answers[-1]
        app.stdin.close()
        assert app.wait(timeout=60) == 0
        assert "[2 utterances embedded in" in app.stderr.read()
    finally:
        app.kill()


@contextlib.contextmanager
def _match_command_answered(bundle):
    """samples/match_command.py reading stdin, after its answer to a first utterance."""
    app = subprocess.Popen([sys.executable, "samples/match_command.py", str(bundle), "-"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, cwd=REPO)
    try:
        app.stdin.write(b"lock the front door\n")
        app.stdin.flush()
        assert b"lock.front_door." in app.stdout.readline()
        yield app
    finally:
        app.kill()


def test_device_application_piped_into_head_ends_quietly(minilm_bundle):
    # `... | match_command.py BUNDLE - | head -1`: once head had its line, the next answer
    # raised BrokenPipeError, and a traceback (and a second one at exit) was printed
    with _match_command_answered(minilm_bundle) as app:
        try:
            app.stdout.close()   # head is done
            app.stdin.write(b"switch on the kitchen light\n" * 50)
            app.stdin.close()
        except BrokenPipeError:   # it ended before reading all of stdin: quietly, checked below
            pass
        assert app.wait(timeout=120) in (0, -signal.SIGPIPE)
        assert b"Traceback" not in app.stderr.read()


def test_ctrl_c_at_the_device_applications_prompt_ends_it_without_a_traceback(minilm_bundle):
    # waiting on stdin for the next utterance, Ctrl-C printed a KeyboardInterrupt traceback
    with _match_command_answered(minilm_bundle) as app:
        app.send_signal(signal.SIGINT)
        assert app.wait(timeout=120) == -signal.SIGINT
        assert b"Traceback" not in app.stderr.read()


def test_no_telemetry_unless_the_application_asks(minilm_bundle, tmp_path):
    """onnxruntime 1.32 writes a device id and an event store under ~/.cache/Microsoft and
    looks up its upload host; `import runtime` turns that off by default,
    and leaves an application's own ORT_DISABLE_TELEMETRY as it is."""
    code = ("import os, sys, runtime; runtime.load(sys.argv[1]).embed(['hi']); "
            "print(os.environ['ORT_DISABLE_TELEMETRY'])")
    for setting, expected in [(None, "1"), ("0", "0")]:
        env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
        home = tmp_path / f"home-{setting}"
        home.mkdir()
        env["HOME"] = str(home)
        if setting is not None:
            env["ORT_DISABLE_TELEMETRY"] = setting
        out = subprocess.run([sys.executable, "-c", code, str(minilm_bundle)], env=env,
                             capture_output=True, text=True, check=True, cwd=tmp_path)
        assert out.stdout.split() == [expected]
        if setting is None:
            assert not (home / ".cache" / "Microsoft").exists()


def test_runtime_in_a_venv_with_only_numpy_and_onnxruntime(minilm_bundle, device_python,
                                                           tmp_path):
    """What a device has: numpy, onnxruntime and the base package, nothing else."""
    py = device_python
    code = ("import sys, json, runtime; m = runtime.load(sys.argv[1]); "
            "print(json.dumps(m.embed(['turn on the kitchen lights']).tolist()))")
    out = subprocess.run([py, "-c", code, str(minilm_bundle)], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    there = np.array(json.loads(out.stdout))
    here = runtime.load(minilm_bundle).embed(["turn on the kitchen lights"])
    np.testing.assert_allclose(there, here, atol=1e-4)


@pytest.mark.slow
def test_install_without_a_c_compiler_falls_back_to_python(minilm_bundle, device_python,
                                                           tmp_path):
    """A device without a C compiler: pip still installs the package (both extensions are
    optional), and the runtime tokenizes with the pure-Python twin after one warning line,
    however many tokenizers it makes."""
    # The sources alone: pip builds in the tree, and setuptools would take the objects a
    # build with a compiler left in build/ as up to date.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "*.so", "*.pyd", "__pycache__"))
    site = tmp_path / "site"
    env = {**os.environ, "CC": "/bin/false"}  # what setuptools compiles with
    subprocess.run([device_python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", "--target", str(site), str(source)], env=env, check=True)
    assert (site / "runtime" / "tokenizer.py").is_file()
    assert not [p.name for p in site.rglob("*") if p.suffix in (".so", ".pyd")]
    code = ("import sys, json, runtime; m = runtime.load(sys.argv[1]); "
            "runtime.Tokenizer.from_file(m.bundle.file('tokenizer.json')); "
            "print(json.dumps([runtime.Tokenizer.backend, "
            "m.embed(['turn on the kitchen lights']).tolist()]))")
    out = subprocess.run([device_python, "-c", code, str(minilm_bundle)], capture_output=True,
                         text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    backend, there = json.loads(out.stdout)
    assert backend == "python"
    warnings = [line for line in out.stderr.splitlines() if "Warning" in line]
    assert len(warnings) == 1 and "C tokenizer is not available" in warnings[0], out.stderr
    here = runtime.load(minilm_bundle).embed(["turn on the kitchen lights"])
    np.testing.assert_allclose(np.array(there), here, atol=1e-4)


def test_holds_only_answers_no_where_a_directory_cannot_be_read(tmp_path, monkeypatch):
    # Path.rglob skipped an unreadable subdirectory silently, so a folder holding a user's
    # unreadable data looked like an earlier bundle, replaceable.
    import os

    from runtime._files import holds_only

    (tmp_path / "sub").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "sub" / "a.txt").write_text("a")
    assert holds_only(tmp_path, {"model.onnx", "sub/a.txt"})
    assert not holds_only(tmp_path, {"model.onnx"})
    os.symlink(tmp_path / "sub", tmp_path / "link")   # a link to a directory is an entry
    assert not holds_only(tmp_path, {"model.onnx", "sub/a.txt"})
    assert holds_only(tmp_path, {"model.onnx", "sub/a.txt", "link"})
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert not holds_only(tmp_path, {"model.onnx", "sub/a.txt", "link"})


def _embed_in_worker(model, texts):
    return model.embed(texts)


def test_a_model_goes_to_worker_processes_loaded_again_there(bundle_copy):
    """pickle.dumps(model) (a process pool's argument) and copy.deepcopy failed with
    onnxruntime's "cannot pickle 'InferenceSession' object"."""
    import concurrent.futures
    import copy
    import multiprocessing
    import pickle

    model = runtime.load(bundle_copy, threads=1, spinning=False)
    texts = ["turn on the kitchen lights", "what time is it"]
    twin = pickle.loads(pickle.dumps(model))
    assert twin is not model and twin.session is not model.session
    assert twin._options == {"threads": 1, "spinning": False, "providers": None,
                             "pipeline": "threads"}
    np.testing.assert_array_equal(twin.embed(texts), model.embed(texts))
    np.testing.assert_array_equal(copy.deepcopy(model).embed(texts), model.embed(texts))
    with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")) as pool:
        np.testing.assert_array_equal(pool.submit(_embed_in_worker, model, texts).result(),
                                      model.embed(texts))
    # another bundle installed there since: refused, not silently another model
    pickled = pickle.dumps(model)
    edit_manifest(bundle_copy, name="another-model")
    with pytest.raises(BundleError, match="changed since the Model was pickled"):
        pickle.loads(pickled)
    model.close()
    with pytest.raises(TypeError, match="is closed; a closed Model cannot be pickled"):
        pickle.dumps(model)


def test_onnxruntime_warnings_are_off_unless_asked_for(tmp_path):
    """A float16 decoder (jetson) loaded on a CPU printed 240 lines of onnxruntime's
    "Could not find a CPU kernel and hence can't constant fold" on every load: a float16
    Mul of constants, as that graph has one per int4 product."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    half = numpy_helper.from_array(np.array([1, 2], np.float16), "half")
    eight = numpy_helper.from_array(np.array(8, np.float16), "eight")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["half", "eight"], ["scaled"], name="fold_me"),
         helper.make_node("Add", ["x", "scaled"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])], [half, eight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "g.onnx")
    code = ("import sys, numpy as np; from runtime.model import ort_session; "
            "s = ort_session(sys.argv[1]); "
            "print(s.run(None, {'x': np.ones(2, np.float16)})[0].tolist())")
    logs = {}
    for level in (None, "warning", "loud"):
        env = {k: v for k, v in os.environ.items() if k != "EDGE_ORT_LOG"}
        if level:
            env["EDGE_ORT_LOG"] = level
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.onnx")],
                              env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
        logs[level] = done
    assert logs[None].returncode == 0 and logs[None].stdout.split() == ["[9.0,", "17.0]"]
    assert "constant fold" not in logs[None].stderr and "W:onnxruntime" not in logs[None].stderr
    assert "constant fold" in logs["warning"].stderr   # what it hid, asked for
    assert logs["loud"].returncode == 1
    assert "EDGE_ORT_LOG is 'loud'; it takes verbose, info, warning, error" in logs["loud"].stderr
