"""A graph on disk: one protobuf file, or over protobuf's 2 GB a file with its weights in
external data beside it. Shared by every stage that saves a graph (partition's stages, the
decoder's float and quantized graphs) and by those that measure or move one (validation,
bundle).

    >>> save_graph(model, Path("float.onnx"))   # a 906M-parameter Llama in float32
    True
    >>> external_files(Path("float.onnx")), graph_bytes(Path("float.onnx"))
    ({'float.onnx.data'}, 3624711236)
"""

from __future__ import annotations

import sys
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
    try:
        return model.ByteSize() > INLINE_LIMIT
    except EncodeError:   # protobuf measures by serializing, which it refuses over 2 GB
        return True


def save_graph(model: onnx.ModelProto, path: Path,
               initializers: Sequence[tuple[str, np.ndarray]] = ()) -> bool:
    """Save `model` at `path`, with `initializers` (name, array) added to its graph; over
    INLINE_LIMIT, with its weights in `path`.data beside it (onnx moves them out of `model`
    to write them there). Returns whether it did that.

    Arrays over the limit together are written to the data file from the arrays, one by one,
    as onnx.save would have written them (the same files): a graph in protobuf costs a copy of
    every weight, and onnx.save's external data conversion another (a 906M-parameter Llama
    peaked at 4.7 times its float32 size)."""
    if sum(array.nbytes for _, array in initializers) > INLINE_LIMIT:
        _save_external(model, path, initializers)
        return True
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


def external_files(path: Path) -> set[str]:
    """The files (relative to the graph's directory, as a manifest names them) that hold the
    external data of the graph at `path`."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(path, load_external_data=False)
    return {Path(ExternalDataInfo(t).location).as_posix() for t in _get_all_tensors(model)
            if uses_external_data(t)}


def graph_bytes(path: Path) -> int:
    """The size of the graph at `path`: its file and its external data files."""
    return path.stat().st_size + sum((path.parent / name).stat().st_size
                                     for name in external_files(path))
