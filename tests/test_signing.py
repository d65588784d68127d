"""Signed bundles: the runtime's pure-Python Ed25519 check against RFC 8032 and the
`cryptography` package, and a bundle signed by the exporter refused by the device the moment
any byte of it, or the key, is not what the device trusts."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import runtime
from exporter.sign import load_signing_key, new_key, sign_bundle
from runtime import BundleError
from runtime._ed25519 import L, P, verify
from runtime._signature import key_id, trusted_keys

REPO = Path(__file__).resolve().parent.parent

# RFC 8032, section 7.1: TEST 1, 2, 3 and SHA(abc) (secret key, public key, message,
# signature), in hex.
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e"
     "39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f"
     "3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67"
     "f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c"
     "23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc"
     "7c66431e0303dca179c138ac17ad9bef1177331a704"),
]


def raw_public(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)


@pytest.mark.parametrize("secret, public, message, signature", RFC8032)
def test_rfc8032_vectors(secret, public, message, signature):
    public, message, signature = map(bytes.fromhex, (public, message, signature))
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert raw_public(private) == public and private.sign(message) == signature
    assert verify(public, message, signature)
    assert not verify(public, message + b"\0", signature)


def test_verify_agrees_with_cryptography_and_refuses_any_changed_bit():
    rng = np.random.default_rng(7)
    for _ in range(40):
        private = Ed25519PrivateKey.generate()
        public = raw_public(private)
        message = rng.bytes(int(rng.integers(0, 300)))
        signature = private.sign(message)
        assert verify(public, message, signature)
        bit = int(rng.integers(0, 512))
        changed = bytearray(signature)
        changed[bit // 8] ^= 1 << bit % 8
        assert not verify(public, message, bytes(changed)), bit
        if message:
            changed = bytearray(message)
            changed[int(rng.integers(0, len(message)))] ^= 1
            assert not verify(public, bytes(changed), signature)
        assert not verify(raw_public(Ed25519PrivateKey.generate()), message, signature)


def test_non_canonical_and_malformed_signatures_are_refused():
    """S + L signs the same equation (the malleability RFC 8032 closes by requiring S < L),
    a public key or R with y >= p encodes a point a second way, and wrong lengths are not
    signatures: all refused, as OpenSSL refuses them."""
    public, message, signature = map(bytes.fromhex, RFC8032[1][1:])
    s = int.from_bytes(signature[32:], "little")
    assert not verify(public, message, signature[:32] + (s + L).to_bytes(32, "little"))
    y = int.from_bytes(public, "little") & ((1 << 255) - 1)
    if y + P < 1 << 255:   # the same y, plus p: not canonical
        assert not verify((y + P | int.from_bytes(public, "little") >> 255 << 255)
                          .to_bytes(32, "little"), message, signature)
    assert not verify((P + 1).to_bytes(32, "little"), message, signature)   # y = 1 as p + 1
    r = int.from_bytes(signature[:32], "little") & ((1 << 255) - 1)
    if r + P < 1 << 255:
        assert not verify(public, message, (r + P).to_bytes(32, "little") + signature[32:])
    for bad in (signature[:63], signature + b"\0", b""):
        assert not verify(public, message, bad)
    assert not verify(public[:31], message, signature)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs from `python -m exporter.sign keygen`: {"release.pem": ..., ...}."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("release", "other"):
        done = subprocess.run([sys.executable, "-m", "exporter.sign", "keygen",
                               str(folder / name)], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert f"key {key_id(next(iter(trusted_keys(folder / (name + '.pub')).values())))}" \
            in done.stdout
    return {p.name: p for p in folder.iterdir()}


@pytest.fixture
def signed(minilm_bundle, keys, tmp_path) -> Path:
    """A copy of the shared bundle, signed with the release key (and its archive)."""
    copy = Path(shutil.copytree(minilm_bundle, tmp_path / "minilm-arm-cpu"))
    assert sign_bundle(copy, keys["release.pem"], tar=True) == \
        load_signing_key(keys["release.pem"]).id
    return copy


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_replaces_one(keys):
    assert keys["release.pem"].stat().st_mode & 0o777 == 0o600
    assert keys["release.pem"].read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert keys["release.pub"].read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = keys["release.pem"].read_bytes()
    done = subprocess.run([sys.executable, "-m", "exporter.sign", "keygen",
                           str(keys["release.pem"].with_suffix(""))],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "refusing to replace a key" in done.stderr
    assert keys["release.pem"].read_bytes() == before


def test_a_signed_bundle_loads_only_where_its_key_is_trusted(signed, minilm_bundle, keys,
                                                             eval_texts):
    release = load_signing_key(keys["release.pem"]).id
    model = runtime.load(signed, signed_by=keys["release.pub"])
    assert model.bundle.signer == release
    np.testing.assert_array_equal(model.embed(eval_texts[:8]),
                                  runtime.load(minilm_bundle).embed(eval_texts[:8]))
    # the key as a str path, as PEM bytes, or among several trusted keys
    for given in (str(keys["release.pub"]), keys["release.pub"].read_bytes(),
                  [keys["other.pub"], keys["release.pub"]]):
        assert runtime.Bundle.open(signed, signed_by=given).signer == release
    other = load_signing_key(keys["other.pem"]).id
    with pytest.raises(BundleError, match=f"signed by key {release}, which is not trusted "
                                          f"here \\(trusted: {other}\\)"):
        runtime.load(signed, signed_by=keys["other.pub"])
    # without signed_by a signed bundle loads as any other; an unsigned one is refused with it
    assert runtime.load(signed).bundle.signer is None
    with pytest.raises(BundleError, match="the bundle is not signed \\(it has no "
                                          "manifest.sig\\)"):
        runtime.load(minilm_bundle, signed_by=keys["release.pub"])


def test_any_change_to_a_signed_bundle_is_refused(signed, keys):
    """An edit of the manifest (a shorter max_length), a changed file whose manifest entry
    was updated to match it, and a damaged signature file: each refused."""
    manifest = (signed / "manifest.json").read_text()
    edited = json.loads(manifest)
    edited["max_length"] = 64
    (signed / "manifest.json").write_text(json.dumps(edited, indent=2) + "\n")
    assert runtime.load(signed).manifest["max_length"] == 64   # a valid, unsigned bundle
    with pytest.raises(BundleError, match="does not match manifest.json .* changed after it "
                                          "was signed"):
        runtime.load(signed, signed_by=keys["release.pub"])
    (signed / "manifest.json").write_text(manifest)
    runtime.load(signed, signed_by=keys["release.pub"])

    entries = json.loads(manifest)
    with open(signed / "tokenizer.json", "ab") as f:
        f.write(b" ")
    entry = next(e for e in entries["files"] if e["path"] == "tokenizer.json")
    from runtime.bundle import sha256_of

    entry["sha256"], entry["bytes"] = sha256_of(signed / "tokenizer.json"), entry["bytes"] + 1
    (signed / "manifest.json").write_text(json.dumps(entries, indent=2) + "\n")
    runtime.load(signed)   # consistent: only the signature tells
    with pytest.raises(BundleError, match="does not match manifest.json"):
        runtime.load(signed, signed_by=keys["release.pub"])

    signature = json.loads((signed / "manifest.sig").read_text())
    for damaged, message in [
            (b"not json", "manifest.sig is damaged"),
            (json.dumps({**signature, "signature": "@@"}).encode(), "manifest.sig is damaged"),
            (json.dumps({**signature, "algorithm": "rsa"}).encode(),
             "holds an 'rsa' signature; this runtime checks ed25519 signatures only"),
            (b" " * 5000, "manifest.sig has 4097 bytes")]:
        (signed / "manifest.sig").write_bytes(damaged)
        with pytest.raises(BundleError, match=message):
            runtime.load(signed, signed_by=keys["release.pub"])


def test_a_device_wide_policy_requires_signatures_where_the_application_names_no_key(
        signed, minilm_bundle, keys, tmp_path, monkeypatch):
    """EDGE_TRUSTED_KEYS: every load, unpack and `python -m runtime` command of the device
    requires one of its keys, as though each had passed signed_by."""
    release = load_signing_key(keys["release.pem"]).id
    monkeypatch.setenv("EDGE_TRUSTED_KEYS", f"{keys['other.pub']}{os.pathsep}"
                                            f"{keys['release.pub']}")
    assert runtime.load(signed).bundle.signer == release
    with pytest.raises(BundleError, match="the bundle is not signed"):
        runtime.load(minilm_bundle)
    with pytest.raises(ValueError, match="EDGE_TRUSTED_KEYS needs verify=True"):
        runtime.load(signed, verify=False)
    with pytest.raises(BundleError, match="the bundle is not signed"):
        runtime.unpack(minilm_bundle.with_name("minilm-arm-cpu.tar"), tmp_path / "device")
    assert not (tmp_path / "device").exists()
    for bundle, status in ((minilm_bundle, 2), (signed, 0)):
        done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(bundle)],
                              capture_output=True, text=True, cwd=REPO)
        assert done.returncode == status, done.stdout + done.stderr
    assert f"signed by key {release}" in done.stdout
    # the application's own keys take its place
    monkeypatch.setenv("EDGE_TRUSTED_KEYS", str(keys["other.pub"]))
    assert runtime.load(signed, signed_by=keys["release.pub"]).bundle.signer == release
    with pytest.raises(BundleError, match="not trusted here"):
        runtime.load(signed)
    monkeypatch.setenv("EDGE_TRUSTED_KEYS", str(tmp_path / "gone.pub"))
    with pytest.raises(FileNotFoundError, match="EDGE_TRUSTED_KEYS: Public key .* does not"):
        runtime.load(signed)
    done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(signed)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "EDGE_TRUSTED_KEYS: Public key" in done.stderr


def test_the_sample_app_runs_only_a_bundle_its_key_signed(signed, minilm_bundle, keys):
    def app(bundle, *key):
        return subprocess.run([sys.executable, "samples/match_command.py", str(bundle),
                               "shut the garage", *key], capture_output=True, text=True,
                              cwd=REPO)

    ran = app(signed, "--key", str(keys["release.pub"]))
    assert ran.returncode == 0 and "cover.garage.close" in ran.stdout, ran.stderr
    for bundle, key, said in [(minilm_bundle, keys["release.pub"], "the bundle is not signed"),
                              (signed, keys["other.pub"], "which is not trusted here"),
                              (signed, keys["release.pem"], "is a private key")]:
        refused = app(bundle, "--key", str(key))
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and not refused.stdout


def test_keys_and_arguments_that_cannot_be_trusted_are_refused(signed, keys, tmp_path):
    with pytest.raises(ValueError, match="signed_by needs verify=True"):
        runtime.load(signed, signed_by=keys["release.pub"], verify=False)
    with pytest.raises(ValueError, match="is a private key; give the public key"):
        runtime.load(signed, signed_by=keys["release.pem"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runtime.load(signed, signed_by=tmp_path / "nothing.pub")
    with pytest.raises(TypeError, match="signed_by takes a path"):
        runtime.load(signed, signed_by=42)
    with pytest.raises(ValueError, match="signed_by is empty"):
        runtime.load(signed, signed_by=[])
    # a PEM public key of another kind (X25519: same size, another algorithm)
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    x25519 = X25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="is not an Ed25519 public key"):
        runtime.load(signed, signed_by=x25519)
    with pytest.raises(ValueError, match="is a public key; signing needs the private key"):
        load_signing_key(keys["release.pub"])


def test_signing_says_when_the_archive_beside_stays_unsigned(minilm_bundle, keys, tmp_path):
    copy = Path(shutil.copytree(minilm_bundle, tmp_path / "minilm-arm-cpu"))
    shutil.copyfile(minilm_bundle.with_name("minilm-arm-cpu.tar"), tmp_path / "minilm-arm-cpu.tar")
    done = subprocess.run([sys.executable, "-m", "exporter.sign", "bundle", str(copy),
                           "--key", str(keys["release.pem"])],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "still holds the bundle unsigned" in done.stderr
    done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(copy)],
                          capture_output=True, text=True, cwd=REPO)
    assert "manifest.sig (key " in done.stdout
    with tarfile.open(tmp_path / "minilm-arm-cpu.tar") as tar:
        assert "minilm-arm-cpu/manifest.sig" not in tar.getnames()


def test_signing_refuses_a_damaged_bundle(minilm_bundle, keys, tmp_path, refused_when_flipped):
    broken = refused_when_flipped(minilm_bundle, "model.onnx", tmp_path, 4096)
    with pytest.raises(BundleError, match="model.onnx: sha256 does not match"):
        sign_bundle(broken, keys["release.pem"])
    assert not (broken / "manifest.sig").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]   # no temporary file


def test_a_signed_archive_unpacks_only_for_its_key(signed, keys, tmp_path):
    archive = signed.with_name(signed.name + ".tar")
    with tarfile.open(archive) as tar:
        assert f"{signed.name}/manifest.sig" in tar.getnames()
    for into, key in ((tmp_path / "refused", keys["other.pub"]), (tmp_path / "device", None)):
        if key is not None:
            with pytest.raises(BundleError, match=f"{archive}: the bundle is signed by key "):
                runtime.unpack(archive, into, signed_by=key)
            assert not into.exists()   # refused before anything was written
    done = subprocess.run([sys.executable, "-m", "runtime", "unpack", str(archive),
                           str(tmp_path / "device"), "--key", str(keys["release.pub"])],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    installed = tmp_path / "device" / signed.name
    assert runtime.load(installed, signed_by=keys["release.pub"]).bundle.signer
    # a re-unpack replaces it (manifest.sig is the bundle's own), unsigned archives too
    assert runtime.unpack(archive, tmp_path / "device") == installed
    signer = load_signing_key(keys["release.pem"]).id
    for argv, said in [([], f", manifest.sig (key {signer}) not checked: give --key;"),
                       (["--key", str(keys["release.pub"])], f", signed by key {signer};")]:
        done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(installed),
                               *argv], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0 and said in done.stdout, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(installed),
                           "--key", str(keys["other.pub"])],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "which is not trusted here" in done.stderr


def test_an_export_over_a_signed_bundle_may_replace_it(signed, keys):
    """manifest.sig is one of the files an export writes: a signed bundle (and its archive)
    is an earlier export's output, which the next export replaces."""
    from exporter.report import check_archive_replaceable, check_replaceable

    check_replaceable(signed)
    check_archive_replaceable(signed.with_name(signed.name + ".tar"), signed.name)
    (signed / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to replace it"):
        check_replaceable(signed)


def test_export_refuses_a_bad_signing_key_before_any_work(keys, tmp_path):
    from exporter import export

    for key, error, message in [
            (tmp_path / "missing.pem", FileNotFoundError, "does not exist"),
            (keys["release.pub"], ValueError, "is a public key"),
            (42, TypeError, "sign_key must be the path of a private key")]:
        with pytest.raises(error, match=message):
            export("minilm", target="arm-cpu", output=tmp_path / "out", sign_key=key)
        assert not (tmp_path / "out").exists()
    (tmp_path / "rsa.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nMIIB\n"
                                       b"-----END PRIVATE KEY-----\n")
    done = subprocess.run([sys.executable, "-m", "exporter", "--target", "arm-cpu",
                           "--output", str(tmp_path / "out"), "--sign-key",
                           str(tmp_path / "rsa.pem")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "not a PEM private key" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_encrypted_key_needs_its_passphrase(tmp_path, monkeypatch, signed):
    monkeypatch.setenv("EDGE_SIGNING_PASSPHRASE", "correct horse")
    private, public = new_key(tmp_path / "locked")
    assert private.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert load_signing_key(private).id == key_id(next(iter(trusted_keys(public).values())))
    monkeypatch.setenv("EDGE_SIGNING_PASSPHRASE", "wrong")
    with pytest.raises(ValueError, match="the passphrase in EDGE_SIGNING_PASSPHRASE does not"):
        load_signing_key(private)
    monkeypatch.delenv("EDGE_SIGNING_PASSPHRASE")
    with pytest.raises(ValueError, match="is encrypted; set EDGE_SIGNING_PASSPHRASE"):
        load_signing_key(private)


def test_openssl_checks_the_signature_too(signed, keys, tmp_path):
    """manifest.sig holds a plain Ed25519 signature of manifest.json's bytes: OpenSSL
    checks it with the public key file as it is, no tool of ours needed."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command on this machine")
    signature = json.loads((signed / "manifest.sig").read_text())["signature"]
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(signature))
    done = subprocess.run([openssl, "pkeyutl", "-verify", "-pubin", "-inkey",
                           str(keys["release.pub"]), "-rawin", "-in",
                           str(signed / "manifest.json"), "-sigfile", str(tmp_path / "sig.bin")],
                          capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert done.returncode == 0 and "Signature Verified Successfully" in done.stdout, \
        done.stdout + done.stderr
