"""Signed bundles: a device then runs only bundles its maker signed.

    python -m exporter.sign keygen keys/release    # keys/release.pem (private), .pub (public)
    python -m exporter --target arm-cpu --sign-key keys/release.pem        # export, signed
    python -m exporter.sign bundle build/minilm-arm-cpu --key keys/release.pem   # sign one

The signature (Ed25519, `manifest.sig` beside `manifest.json`) covers manifest.json's bytes,
and manifest.json every other file's sha256: changing any byte of the bundle, the manifest
included, breaks it. The device trusts the public key: `runtime.load(path,
signed_by="release.pub")`, `python -m runtime verify BUNDLE --key release.pub` (the same
for `unpack`). The private key is a PKCS#8 PEM file, as `keygen` or `openssl genpkey
-algorithm ed25519` writes it; an encrypted one is opened with the passphrase in
EDGE_SIGNING_PASSPHRASE (keygen encrypts with it too, where it is set). Signing uses the
`cryptography` package (in the export extra); the device checks with the standard library.

Exit status: 0 done (one line: the key or bundle written, or the signed bundle and key id),
2 bad input (a missing or damaged bundle, a key that is not an Ed25519 private key, a key
file that exists), 1 anything else.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime._files import write_archive
from runtime._signature import (
    SIGNATURE_FILE,
    check_signature,
    key_id,
    public_key_from_pem,
    read_key_file,
    trusted_keys,
)
from runtime.bundle import Bundle, BundleError

PASSPHRASE_VARIABLE = "EDGE_SIGNING_PASSPHRASE"


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key (a `cryptography` key object), with its public key's PEM and
    id (`runtime._signature.key_id`)."""

    private: object
    public_pem: bytes
    id: str

    def signature_file(self, manifest: bytes) -> bytes:
        """manifest.sig's bytes for manifest.json's bytes `manifest`; checked with the
        runtime's own verifier before it is returned, so a device accepts what is written."""
        fields = {"algorithm": "ed25519", "key": self.id,
                  "signature": base64.b64encode(self.private.sign(manifest)).decode("ascii")}
        data = (json.dumps(fields) + "\n").encode("ascii")
        check_signature(manifest, data, trusted_keys(self.public_pem))
        return data


def _cryptography():
    """cryptography's serialization module and Ed25519 private key class; ImportError saying
    how to install it where it is missing."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise ImportError("signing needs the 'cryptography' package (in the export extra): "
                          "pip install cryptography") from None
    return serialization, Ed25519PrivateKey


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_VARIABLE)
    return value.encode("utf-8") if value else None


def _signing_key(private) -> SigningKey:
    serialization, _ = _cryptography()
    public = private.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(private, pem, key_id(raw))


def load_signing_key(path: str | Path) -> SigningKey:
    """The Ed25519 private key in PEM file `path`; FileNotFoundError where there is none,
    ValueError where it is not one (or is encrypted and EDGE_SIGNING_PASSPHRASE does not
    open it)."""
    data = read_key_file(path, "Signing key", ".pem", "; make one with: python -m "
                                                      "exporter.sign keygen keys/release")
    path = Path(path)
    if b"-----BEGIN PUBLIC KEY-----" in data:
        raise ValueError(f"{path} is a public key; signing needs the private key (the .pem "
                         f"that keygen wrote beside it).")
    serialization, private_class = _cryptography()
    from cryptography.exceptions import UnsupportedAlgorithm

    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    password = _passphrase() if encrypted else None
    if encrypted and password is None:
        raise ValueError(f"{path} is encrypted; set {PASSPHRASE_VARIABLE} to its passphrase.")
    try:
        private = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        why = "the passphrase in " + PASSPHRASE_VARIABLE + " does not open it" if encrypted \
            else f"not a PEM private key ({e})"
        raise ValueError(f"{path}: {why}.") from None
    if not isinstance(private, private_class):
        kind = type(private).__name__.lstrip("_").removesuffix("PrivateKey")
        raise ValueError(f"{path} holds a key of type {kind}; bundles are signed with "
                         f"Ed25519 keys (python -m exporter.sign keygen, or openssl genpkey "
                         f"-algorithm ed25519).")
    return _signing_key(private)


def new_key(prefix: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair written to `<prefix>.pem` (private, mode 0600; encrypted with
    EDGE_SIGNING_PASSPHRASE where set) and `<prefix>.pub` (public); returns both paths.
    Refuses, writing nothing, where either exists."""
    serialization, private_class = _cryptography()
    prefix = Path(prefix)
    private_path = prefix.with_name(prefix.name + ".pem")
    public_path = prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{str(path)!r} exists; refusing to replace a key (the "
                                  f"bundles it signed would no longer verify against a new "
                                  f"one). Choose another name.")
    if not prefix.parent.is_dir():
        raise FileNotFoundError(f"Directory {str(prefix.parent)!r} does not exist; make it "
                                f"first (keep it out of version control).")
    key = _signing_key(private_class.generate())
    password = _passphrase()
    encryption = serialization.BestAvailableEncryption(password) if password else \
        serialization.NoEncryption()
    pem = key.private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8, encryption)
    written = []
    try:
        for path, data, mode in ((private_path, pem, 0o600), (public_path, key.public_pem, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except BaseException:   # both or neither
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def sign_bundle(bundle: str | Path, key: SigningKey | str | Path, *, tar: bool = False) -> str:
    """Sign the bundle directory `bundle` with `key` (a SigningKey or its PEM file): write
    its manifest.sig (replacing an earlier signature), and with `tar` also `<bundle>.tar`
    (replacing an earlier archive of it). The bundle is verified first (every file's sha256,
    as `runtime.load` does): a damaged bundle is not signed. Returns the key's id."""
    from .report import check_archive_replaceable

    if not isinstance(key, SigningKey):
        key = load_signing_key(key)
    opened = Bundle.open(bundle)
    manifest = (opened.path / "manifest.json").read_bytes()
    if json.loads(manifest.decode("utf-8")) != opened.manifest:
        raise BundleError(f"{opened.path}/manifest.json changed while it was checked; sign "
                          f"it once it is done.")
    signature = key.signature_file(manifest)
    archive = opened.path.with_name(opened.path.name + ".tar")
    if tar:
        check_archive_replaceable(archive, opened.path.name)
    # written beside the bundle and renamed in: the bundle never holds a half-written or
    # an unlisted temporary file
    _replace(opened.path / SIGNATURE_FILE, opened.path.parent,
             lambda temp: temp.write_bytes(signature))
    if tar:
        _replace(archive, opened.path.parent, lambda temp: write_archive(
            opened.path, temp, name=opened.path.name, created=opened.manifest["created"]))
    return key.id


def _replace(final: Path, beside: Path, write) -> None:
    """`write(temporary path)` in directory `beside`, synced, then renamed to `final`
    (mode 0644): `final` is the old file or the whole new one, never part of it."""
    fd, temp = tempfile.mkstemp(dir=beside, prefix=f".{final.name}.")
    os.close(fd)
    try:
        write(Path(temp))
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, final)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporter.sign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="write a new key pair: PREFIX.pem, PREFIX.pub")
    keygen.add_argument("prefix", help="e.g. keys/release")
    sign = commands.add_parser("bundle", help="sign an exported bundle directory")
    sign.add_argument("bundle", help="the bundle directory")
    sign.add_argument("--key", required=True, metavar="KEY.pem", help="the private key")
    sign.add_argument("--tar", action="store_true",
                      help="also write <bundle>.tar, signed, for runtime.unpack")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            private, public = new_key(args.prefix)
            print(f"{private} (private: keep it off the devices), {public} (public: give "
                  f"it to runtime.load(..., signed_by=...)), key "
                  f"{key_id(public_key_from_pem(public.read_bytes(), str(public)))}")
        else:
            signer = sign_bundle(args.bundle, args.key, tar=args.tar)
            print(f"{args.bundle}: signed by key {signer}")
            archive = Path(args.bundle).with_name(Path(args.bundle).name + ".tar")
            if not args.tar and archive.is_file():
                print(f"note: {archive} still holds the bundle unsigned; sign with --tar to "
                      f"rewrite it", file=sys.stderr)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError,
            NotADirectoryError) as e:   # BundleError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ImportError, OSError) as e:   # no cryptography; a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
