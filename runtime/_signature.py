"""Signed bundles: `manifest.sig` beside `manifest.json` holds an Ed25519 signature of
manifest.json's exact bytes; the manifest holds every other file's sha256, so one signature
vouches for the whole bundle. The exporter signs (`--sign-key`, `python -m exporter.sign`);
the runtime checks the signature against the public keys the application trusts
(`runtime.load(path, signed_by="bundle-key.pub")`), with the standard library alone.

manifest.sig is a small JSON object:

    {"algorithm": "ed25519", "key": "3f0c9a1be2d47a65", "signature": "<base64, 64 bytes>"}

`key` names the signing key: the first 16 hex digits of the sha256 of its 32-byte public
key (`key_id`), so that a refusal can say which key signed and which are trusted. Public keys
are PEM files ("-----BEGIN PUBLIC KEY-----", as `openssl pkey -pubout` writes them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from ._ed25519 import verify

SIGNATURE_FILE = "manifest.sig"
MAX_SIGNATURE_BYTES = 4096     # a signature file is ~140 bytes
MAX_KEY_FILE_BYTES = 64 << 10  # a PEM public key is 113 bytes

# DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410) before its 32 key bytes.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


class TrustedKeys(dict):
    """{key id: 32-byte Ed25519 public key}: the keys a bundle may be signed by."""


def key_id(public_key: bytes) -> str:
    """The short name of a raw 32-byte public key: its sha256's first 16 hex digits."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def public_key_from_pem(pem: bytes, where: str) -> bytes:
    """The raw 32 bytes of the Ed25519 public key in PEM text `pem` (read from `where`)."""
    text = pem.decode("ascii", errors="replace")
    if "PRIVATE KEY-----" in text:
        raise ValueError(f"{where} is a private key; give the public key (the .pub file "
                         f"beside it). The private key stays on the machine that signs.")
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{where} is not a PEM public key (one '{begin}' block, as "
                         f"`python -m exporter.sign keygen` or `openssl pkey -pubout` "
                         f"writes).")
    body = "".join(text[text.index(begin) + len(begin):text.index(end)].split())
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: the PEM block is not valid base64.") from None
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise ValueError(f"{where} is not an Ed25519 public key (bundles are signed with "
                         f"Ed25519 keys only).")
    return der[len(_SPKI_PREFIX):]


def read_key_file(path: str | os.PathLike, what: str, suffix: str, hint: str = "") -> bytes:
    """The bytes of key file `path` ("Public key" or "Signing key" `what`, usually a
    `suffix` file); FileNotFoundError where it names nothing or no file (`hint` says how to
    make one), ValueError where it is far too big to be a PEM key."""
    if isinstance(path, str) and not path.strip():
        raise FileNotFoundError(f"{what} path {path!r} is empty; name the {suffix} file.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (or is not a "
                                f"file){hint}.")
    with open(path, "rb") as f:
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} is over {MAX_KEY_FILE_BYTES} bytes; an Ed25519 key in PEM "
                         f"has about 120.")
    return data


def trusted_keys(signed_by) -> TrustedKeys:
    """The keys `signed_by` names: a path to a PEM public key file, the PEM text as bytes,
    or a list or tuple of these (any one of them may have signed)."""
    if isinstance(signed_by, TrustedKeys):
        return signed_by
    given = list(signed_by) if isinstance(signed_by, (list, tuple)) else [signed_by]
    if not given:
        raise ValueError("signed_by is empty: name at least one public key (a .pub file).")
    keys = TrustedKeys()
    for item in given:
        if isinstance(item, (bytes, bytearray)):
            raw = public_key_from_pem(bytes(item), "signed_by's bytes")
        elif isinstance(item, (str, os.PathLike)):
            raw = public_key_from_pem(read_key_file(item, "Public key", ".pub"), str(item))
        else:
            raise TypeError(f"signed_by takes a path to a PEM public key, its bytes, or a "
                            f"list of them; got {type(item).__name__}.")
        keys[key_id(raw)] = raw
    return keys


def check_signature(manifest: bytes, signature_file: bytes | None, keys: TrustedKeys) -> str:
    """The id of the trusted key whose signature of `manifest` (manifest.json's bytes)
    `signature_file` (manifest.sig's bytes; None: there is none) holds; ValueError saying
    why otherwise."""
    trusted = ", ".join(sorted(keys))
    if signature_file is None:
        raise ValueError(f"the bundle is not signed (it has no {SIGNATURE_FILE}), and only "
                         f"bundles signed by key {trusted} are accepted.")
    if len(signature_file) > MAX_SIGNATURE_BYTES:
        raise ValueError(f"{SIGNATURE_FILE} has {len(signature_file)} bytes; a signature file "
                         f"has about 140.")
    try:
        fields = json.loads(signature_file.decode("utf-8"))
        algorithm, signer = fields["algorithm"], fields["key"]
        signature = base64.b64decode(fields["signature"], validate=True)
        if not (isinstance(algorithm, str) and isinstance(signer, str)):
            raise TypeError
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        raise ValueError(f"{SIGNATURE_FILE} is damaged: it must be a JSON object with "
                         f"\"algorithm\", \"key\" and \"signature\" (base64).") from None
    if algorithm != "ed25519":
        raise ValueError(f"{SIGNATURE_FILE} holds an {algorithm!r} signature; this runtime "
                         f"checks ed25519 signatures only.")
    if signer not in keys:
        raise ValueError(f"the bundle is signed by key {signer}, which is not trusted here "
                         f"(trusted: {trusted}).")
    if not verify(keys[signer], manifest, signature):
        raise ValueError(f"the signature in {SIGNATURE_FILE} does not match manifest.json "
                         f"(key {signer}): the manifest was changed after it was signed.")
    return signer
