"""The files an ONNX graph reads its weights from (external data), found without the onnx
package: a walk over the protobuf wire format of ModelProto that skips every tensor's bytes.

onnxruntime opens each location a tensor names, relative to the graph's directory; a bundle's
runtime checks that each one is a file the manifest lists (so verified), where the manifest's
own "external_data" field could name one file and the graph read another.

Field numbers are onnx.proto's: ModelProto.graph 7, .functions 25; GraphProto.node 1,
.initializer 5, .sparse_initializer 15; FunctionProto.node 7; NodeProto.attribute 5;
AttributeProto.t 5, .g 6, .tensors 10, .graphs 11, .sparse_tensor 22, .sparse_tensors 23;
SparseTensorProto.values 1, .indices 2; TensorProto.external_data 13 (key 1, value 2).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

_LENGTH = 2   # wire type of strings, bytes and messages


def external_locations(path: Path) -> set[str]:
    """The "location" of every tensor in the graph file `path` stored as external data.
    Empty for a graph without any, and for bytes that are no ModelProto (onnxruntime then
    says what is wrong with them)."""
    found: set[str] = set()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for field, start, end in _messages(data, 0, len(data)):
                if field == 7:
                    _graph(data, start, end, found)
                elif field == 25:
                    for inner, a, b in _messages(data, start, end):
                        if inner == 7:
                            _node(data, a, b, found)
    except (ValueError, IndexError, OSError):   # not protobuf, or an empty file (mmap)
        return set()
    return found


def _varint(data, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _messages(data, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in
    data[start:end]; the other fields are skipped."""
    i = start
    while i < end:
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == _LENGTH:
            size, i = _varint(data, i)
            if i + size > end:
                raise ValueError("field runs past its message")
            yield key >> 3, i, i + size
            i += size
        else:
            raise ValueError(f"wire type {wire}")
    if i != end:
        raise ValueError("field runs past its message")


def _graph(data, start: int, end: int, found: set[str]) -> None:
    for field, a, b in _messages(data, start, end):
        if field == 1:
            _node(data, a, b, found)
        elif field == 5:
            _tensor(data, a, b, found)
        elif field == 15:
            _sparse(data, a, b, found)


def _node(data, start: int, end: int, found: set[str]) -> None:
    for field, a, b in _messages(data, start, end):
        if field != 5:
            continue
        for inner, c, d in _messages(data, a, b):   # an attribute
            if inner in (5, 10):
                _tensor(data, c, d, found)
            elif inner in (6, 11):
                _graph(data, c, d, found)
            elif inner in (22, 23):
                _sparse(data, c, d, found)


def _sparse(data, start: int, end: int, found: set[str]) -> None:
    for field, a, b in _messages(data, start, end):
        if field in (1, 2):
            _tensor(data, a, b, found)


def _tensor(data, start: int, end: int, found: set[str]) -> None:
    for field, a, b in _messages(data, start, end):
        if field != 13:
            continue
        entry = {key: bytes(data[c:d]) for key, c, d in _messages(data, a, b)}
        if entry.get(1) == b"location" and 2 in entry:
            found.add(entry[2].decode("utf-8", errors="replace"))
