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

from pathlib import Path

import onnx
from google.protobuf.message import EncodeError

# A graph larger than this cannot be one protobuf (onnx.save, onnx.checker and
# SerializeToString refuse it): it is saved with its weights in an external data file beside
# it, NAME.onnx.data, and checked and run from its path. (Tests lower it to exercise that.)
INLINE_LIMIT = 2**31 - 1


def too_big(model: onnx.ModelProto) -> bool:
    """Whether `model` is over INLINE_LIMIT, so that it can be saved, checked and run only
    with its weights in external data."""
    try:
        return model.ByteSize() > INLINE_LIMIT
    except EncodeError:   # protobuf measures by serializing, which it refuses over 2 GB
        return True


def save_graph(model: onnx.ModelProto, path: Path) -> bool:
    """Save `model` at `path`; over INLINE_LIMIT, with its weights in `path`.data beside it
    (onnx moves them out of `model` to write them there). Returns whether it did that."""
    if too_big(model):
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.name}.data")
        return True
    onnx.save(model, path)
    return False


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
