"""A graph on disk: one protobuf file, or over protobuf's 2 GB a file with its weights in
external data beside it. Shared by every stage that saves a graph (partition's stages, the
decoder's float and quantized graphs, the encoder's optimized, smoothed, int8 and float16
graphs), by those that measure or move one (validation, bundle), and by those that run a
graph they hold in memory (calibration, scoring: graph_session).

    >>> save_graph(model, Path("float.onnx"))   # a 906M-parameter Llama in float32
    True
    >>> external_files(Path("float.onnx")), graph_bytes(Path("float.onnx"))
    ({'float.onnx.data'}, 3624711236)
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import helper, numpy_helper

# A graph larger than this cannot be one protobuf (onnx.save, onnx.checker and
# SerializeToString refuse it): it is saved with its weights in an external data file beside
# it, NAME.onnx.data, and checked and run from its path. (Tests lower it to exercise that.)
INLINE_LIMIT = 2**31 - 1

# The smallest initializer onnx.save moves to external data: its size_threshold, 1024, is
# compared with sys.getsizeof(raw_data), which counts the bytes object's header.
EXTERNAL_MIN = 1024 - sys.getsizeof(b"")


def too_big(model: onnx.ModelProto) -> bool:
    """Whether `model` is over INLINE_LIMIT, so that it can be saved, checked and run only
    with its weights in external data."""
    if raw_bytes(model) > INLINE_LIMIT:
        return True
    try:
        return model.ByteSize() > INLINE_LIMIT
    except EncodeError:   # protobuf measures by serializing, which it refuses over 2 GB
        return True


def save_graph(model: onnx.ModelProto, path: Path,
               initializers: Sequence[tuple[str, np.ndarray]] = ()) -> bool:
    """Save `model` at `path`, with `initializers` (name, array) added to its graph; over
    INLINE_LIMIT, with its weights in `path`.data beside it (onnx moves them out of `model`
    to write them there). Returns whether it did that.

    `initializers` are written from the arrays, one by one, as onnx.save would have written
    them (the same files): to the data file when they are over the limit together, else into
    the graph's file. A graph in protobuf costs a copy of every weight, and onnx.save another
    (the external data conversion, or the serialized bytes): a 906M-parameter Llama peaked at
    4.7 times its float32 size, a 371M-parameter one too."""
    if sum(array.nbytes for _, array in initializers) > INLINE_LIMIT:
        _save_external(model, path, initializers)
        return True
    if initializers and _save_inline(model, path, initializers):
        return False
    model.graph.initializer.extend(numpy_helper.from_array(array, name)
                                   for name, array in initializers)
    if too_big(model):
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.name}.data")
        return True
    onnx.save(model, path)
    return False


def _save_external(model: onnx.ModelProto, path: Path,
                   initializers: Sequence[tuple[str, np.ndarray]]) -> None:
    """save_graph over the limit: each initializer of EXTERNAL_MIN bytes or more written to
    `path`.data at the end of the previous one, the others inline."""
    data = path.with_name(f"{path.name}.data")
    with data.open("wb") as file:
        for name, array in initializers:
            if array.nbytes < EXTERNAL_MIN:
                model.graph.initializer.append(numpy_helper.from_array(array, name))
                continue
            tensor = model.graph.initializer.add(
                name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(
                    array.dtype), data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", file.tell()),
                               ("length", array.nbytes)):
                tensor.external_data.add(key=key, value=str(value))
            file.write(np.ascontiguousarray(array).data)
    onnx.save(model, path)


def _save_inline(model: onnx.ModelProto, path: Path,
                 initializers: Sequence[tuple[str, np.ndarray]]) -> bool:
    """save_graph under the limit: the bytes onnx.save writes for `model` with `initializers`
    appended to its graph, written piece by piece from the arrays (the whole graph as a
    protobuf, then serialized, held every weight twice more: a 371M-parameter Llama's
    build_float peaked at 4.7 times its float32 size). Protobuf writes a message's fields in
    field number order, a message field as tag, length, bytes: the model is its fields
    before the graph, the graph's tag and length, the graph's fields before its initializers,
    the initializers, the graph's fields after them, the model's fields after the graph.
    Returns False, writing nothing, where that would be over INLINE_LIMIT."""
    graph_field = model.DESCRIPTOR.fields_by_name["graph"].number
    init_field = model.graph.DESCRIPTOR.fields_by_name["initializer"].number
    model_head, model_tail = _split(model, graph_field)
    graph_head, graph_tail = _split(model.graph, init_field)
    present = onnx.GraphProto()   # any the graph already has come first, as extend leaves them
    present.initializer.extend(model.graph.initializer)
    present = present.SerializeToString()
    records = []   # per initializer: the field's tag and length, its TensorProto up to the data
    for name, array in initializers:
        tensor = _tensor_head(name, array)
        records.append(_record(init_field, len(tensor) + array.nbytes) + tensor)
    graph_size = len(graph_head) + len(present) + len(graph_tail) + sum(
        len(record) + array.nbytes for record, (_, array) in zip(records, initializers,
                                                                 strict=True))
    head = model_head + _record(graph_field, graph_size) + graph_head + present
    if len(head) - len(graph_head) - len(present) + graph_size + len(model_tail) > INLINE_LIMIT:
        return False   # as too_big(model with its initializers) would say
    with path.open("wb") as file:
        file.write(head)
        for record, (_, array) in zip(records, initializers, strict=True):
            file.write(record)
            file.write(np.ascontiguousarray(array).data)
        file.write(graph_tail + model_tail)
    return True


def _tensor_head(name: str, array: np.ndarray) -> bytes:
    """numpy_helper.from_array(array, name) serialized, up to its raw_data (the array's
    bytes, little-endian as on every host the exporter runs): tag and length included, the
    last field it writes (checked)."""
    assert array.dtype.kind in "biuf" and sys.byteorder == "little", array.dtype
    tensor = numpy_helper.from_array(np.empty((0,), array.dtype), name)
    tensor.ClearField("raw_data")
    tensor.dims[:] = array.shape
    raw = tensor.DESCRIPTOR.fields_by_name["raw_data"].number
    assert all(d.number < raw for d, _ in tensor.ListFields())
    return tensor.SerializeToString() + _record(raw, array.nbytes)


def _record(number: int, size: int) -> bytes:
    """The tag and length of length-delimited field `number` holding `size` bytes."""
    return _varint(number << 3 | 2) + _varint(size)


def _split(message, number: int) -> tuple[bytes, bytes]:
    """`message`'s serialized fields numbered below `number`, and above it."""
    below, above = type(message)(), type(message)()
    below.CopyFrom(message)
    above.CopyFrom(message)
    for descriptor, _ in message.ListFields():
        if descriptor.number >= number:
            below.ClearField(descriptor.name)
        if descriptor.number <= number:
            above.ClearField(descriptor.name)
    return below.SerializeToString(), above.SerializeToString()


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint: 7 bits a byte, low first, the high bit on all but the last."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def save_model(model: onnx.ModelProto, path: Path) -> bool:
    """onnx.save(model, path) under INLINE_LIMIT; over it, with its weights in `path`.data as
    save_graph writes them, but written from `model`'s tensors one at a time, leaving `model`
    as it was (the stage goes on using it). Returns whether the weights went to `path`.data.
    A `path`.data left by an earlier save of `path` is removed first: onnx appends to it."""
    return _save_serialized(model, _serialized(model), path)


def _serialized(model: onnx.ModelProto) -> bytes | None:
    """`model` as protobuf bytes; None over INLINE_LIMIT. (Asking too_big first serialized
    it twice: protobuf measures a message by serializing it.)"""
    if raw_bytes(model) > INLINE_LIMIT:   # no doomed attempt
        return None
    try:
        data = model.SerializeToString()
    except EncodeError:   # over 2 GB
        return None
    return data if len(data) <= INLINE_LIMIT else None


def _save_serialized(model: onnx.ModelProto, data: bytes | None, path: Path) -> bool:
    """save_model with `model`'s bytes already made (None: over the limit)."""
    path.with_name(f"{path.name}.data").unlink(missing_ok=True)
    if data is not None:
        path.write_bytes(data)   # what onnx.save writes
        return False
    _save_external(_skeleton(model), path, ((t.name, numpy_helper.to_array(t))
                                            for t in model.graph.initializer))
    return True


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose weight matrices (initializers of two or more dimensions and
    EXTERNAL_MIN bytes or more) keep their name, type and shape but no values (marked as
    external data that is nowhere): what shape inference reads (it takes the values of
    vectors, a bias or a scale, as well as of shapes), small enough to serialize whatever
    the size of `model`."""
    light = _skeleton(model)
    for tensor in model.graph.initializer:
        if len(tensor.dims) < 2 or tensor.ByteSize() < EXTERNAL_MIN:
            copy_fields(tensor, light.graph.initializer.add())
            continue
        light.graph.initializer.add(
            name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
            data_location=onnx.TensorProto.EXTERNAL).external_data.add(
            key="location", value="no-weights")
    return light


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without its initializers, copied field by field."""
    skeleton = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(skeleton, fd, value)
    skeleton.graph.SetInParent()
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(skeleton.graph, fd, value)
    return skeleton


def check_and_save(model: onnx.ModelProto, path: Path) -> bool:
    """onnx.checker on `model`, then save_model: in memory under INLINE_LIMIT, over it from
    the saved file (onnx checks a graph over 2 GB only by path). Returns save_model's answer.
    The graph is serialized once, for both."""
    data = _serialized(model)
    if data is not None:
        onnx.checker.check_model(data)
        return _save_serialized(model, data, path)
    _save_serialized(model, None, path)
    onnx.checker.check_model(str(path))
    return True


def graph_session(model: onnx.ModelProto, *, threads: int = 0):
    """An onnxruntime session on `model` in memory, whatever its size: its graph as bytes,
    with its weights handed to onnxruntime apart, as in-memory external data (weights_apart).

    Serializing the whole graph instead, as onnxruntime takes it, costs about 0.2 s for
    MiniLM's 90 MB (upb's serializer runs at about 450 MB/s), and the sensitivity search
    scores about fifty such graphs. Either way the weights are copied once on their way
    (protobuf hands out copies of its bytes): with weights over INLINE_LIMIT the session
    reads them instead from a copy saved by save_model in a temporary directory, which costs
    no third copy in memory."""
    from runtime.model import ort_session

    if weight_bytes(model) > INLINE_LIMIT:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(model, path)
            return ort_session(path, threads=threads)
    light, weights = weights_apart(model)
    return ort_session(light.SerializeToString(), threads=threads, external_data=weights)


def weight_bytes(model: onnx.ModelProto) -> int:
    """The bytes of `model`'s initializers, from their shapes and types (none is read)."""
    return _bytes_of(model.graph.initializer)


def raw_bytes(model: onnx.ModelProto) -> int:
    """weight_bytes of the initializers held in raw_data: a floor of `model`'s serialized
    size, so a model over INLINE_LIMIT by this count need not be serialized (or copied,
    which serializes it) to learn that protobuf refuses it. In a 2 GB graph the attempt
    costs seconds before it fails."""
    return _bytes_of(t for t in model.graph.initializer if t.HasField("raw_data"))


def _bytes_of(tensors) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64))
               * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in tensors)


def weights_apart(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, bytes]]:
    """(`model` whose initializers of EXTERNAL_MIN bytes or more refer to external data,
    {file name: bytes}), one in-memory file per initializer, for ort_session's
    `external_data`. Initializers already in external data or with typed fields (not
    raw_data) stay as they are. `model` is left as it was."""
    light = _skeleton(model)
    weights: dict[str, bytes] = {}
    for tensor in model.graph.initializer:
        raw = tensor.raw_data if tensor.data_location != onnx.TensorProto.EXTERNAL else b""
        if len(raw) < EXTERNAL_MIN:
            copy_fields(tensor, light.graph.initializer.add())
            continue
        name = f"weight-{len(weights)}"
        weights[name] = raw
        moved = light.graph.initializer.add(name=tensor.name, dims=tensor.dims,
                                            data_type=tensor.data_type,
                                            data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", name), ("offset", "0"), ("length", str(len(raw)))):
            moved.external_data.add(key=key, value=value)
    return light, weights


def model_bytes(model: onnx.ModelProto) -> int:
    """The bytes `model` takes saved (save_model): its protobuf size, or over INLINE_LIMIT,
    which protobuf does not measure, its weights' and nodes' (both files together, within
    their few headers)."""
    try:
        return model.ByteSize()
    except EncodeError:
        return sum(t.ByteSize() for t in model.graph.initializer) \
            + sum(n.ByteSize() for n in model.graph.node)


class FreshNames:
    """Tensor names a rewrite may add to `graph`: `fresh("h_scale")` is "h_scale" unless the
    graph (a subgraph included) or an earlier call already has that name, then "h_scale_1",
    "h_scale_2", ... ONNX refuses a graph that defines a name twice, and a rewrite that
    derives its names from the ones it finds (h -> h_scale, h_q, h_dq) meets names a model
    may already hold: an embedding Gather whose output a MatMul reads directly (OPT's
    project_in) gets both an activation scale and a row scale named after it.

        >>> fresh = FreshNames(model.graph)   # the graph has "emb" and "emb_scale"
        >>> fresh("emb_scale"), fresh("emb_scale"), fresh("emb_q")
        ('emb_scale_1', 'emb_scale_2', 'emb_q')
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken = tensor_names(graph)

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name `graph` and its subgraphs define or read."""
    names = {t.name for t in graph.initializer}
    names.update(t.values.name for t in graph.sparse_initializer)
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                names |= tensor_names(sub)
    names.discard("")   # an omitted optional input
    return names


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model`, field by field over 2 GB (CopyFrom serializes it)."""
    copy = onnx.ModelProto()
    if raw_bytes(model) > INLINE_LIMIT:   # CopyFrom would serialize it all, then refuse
        copy_fields(model, copy)
        return copy
    try:
        copy.CopyFrom(model)
    except EncodeError:
        copy.Clear()
        copy_fields(model, copy)
    return copy


def copy_fields(source, target) -> None:
    """`source`'s fields into `target`, field by field: protobuf copies a message by
    serializing it (CopyFrom, extend, even append), and refuses one over 2 GB."""
    for fd, value in source.ListFields():
        _copy_field(target, fd, value)


def _copy_field(target, fd, value) -> None:
    repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
    if fd.type == fd.TYPE_MESSAGE and repeated:
        for item in value:
            copy_fields(item, getattr(target, fd.name).add())
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(target, fd.name).SetInParent()   # present, if empty: a scalar's shape
        copy_fields(value, getattr(target, fd.name))
    elif repeated:
        getattr(target, fd.name).extend(value)
    else:
        setattr(target, fd.name, value)


def external_files(path: Path) -> set[str]:
    """The files (relative to the graph's directory, as a manifest names them) that hold the
    external data of the graph at `path`.

    Read without loading the graph's initializers: onnx.load parses every weight stored in
    the file (a graph under 2 GB holds them all), a copy of the file and another of the
    weights, twice the graph in memory to learn that it has no external data. The file's
    fields are walked instead, each initializer's data skipped by its length; the rest of the
    model (nodes, functions: small) is parsed and searched as onnx does."""
    import mmap

    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    raw_field = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
    rest, graph, tensors = [], [], []   # the model's other fields, the graph's other fields
    with path.open("rb") as file:
        size = path.stat().st_size
        with (mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else
              memoryview(b"")) as data, memoryview(data) as view:
            for number, field, payload in _fields(view, 0, len(view)):
                if number != graph_field:
                    rest.append(bytes(view[field]))
                    continue
                for inner, part, tensor in _fields(view, payload.start, payload.stop):
                    if inner != init_field:
                        graph.append(bytes(view[part]))
                        continue
                    tensors.append(onnx.TensorProto.FromString(b"".join(   # but its data
                        bytes(view[f]) for n, f, _ in _fields(view, tensor.start, tensor.stop)
                        if n != raw_field)))
    model = onnx.ModelProto.FromString(b"".join(rest))
    model.graph.ParseFromString(b"".join(graph))
    return {Path(ExternalDataInfo(t).location).as_posix()
            for t in (*tensors, *_get_all_tensors(model)) if uses_external_data(t)}


def _fields(view: memoryview, start: int, end: int):
    """(field number, slice of the whole field, slice of its payload where length-delimited)
    for each field of the protobuf message encoded in view[start:end]."""
    at = start
    while at < end:
        first = at
        key, at = _read_varint(view, at)
        kind, payload = key & 7, None
        if kind == 0:
            _, at = _read_varint(view, at)
        elif kind in (1, 5):   # fixed 64 or 32 bits
            at += 8 if kind == 1 else 4
        elif kind == 2:
            size, at = _read_varint(view, at)
            payload, at = slice(at, at + size), at + size
        else:
            raise ValueError(f"{kind} is not a protobuf wire type this reader takes (byte "
                             f"{first}): not an ONNX model")
        if at > end:
            raise ValueError(f"protobuf field at byte {first} runs past its message's end: "
                             f"not an ONNX model, or a truncated one")
        yield key >> 3, slice(first, at), payload


def _read_varint(view: memoryview, at: int) -> tuple[int, int]:
    """The varint at view[at] and where the next field starts."""
    value = shift = 0
    while True:
        if at >= len(view):
            raise ValueError("protobuf varint runs past the end of the file: a truncated model")
        byte = view[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def graph_bytes(path: Path) -> int:
    """The size of the graph at `path`: its file and its external data files."""
    return path.stat().st_size + sum((path.parent / name).stat().st_size
                                     for name in external_files(path))
