"""The weights of an exported ONNX graph: each stored once, in one external-data file beside the graph.

Folds trained with LoRA on one frozen base share most of their weights (at Virchow size, the SwiGLU MLPs: two
thirds of a block). ``compact`` makes the graph hold each distinct weight once, whoever reads it; ONNX Runtime
then also keeps one copy in memory, and ONNX Runtime's quantizer quantizes a shared MatMul weight once (a Gemm's
it cannot: ``unshare_weights`` gives each Gemm its own, a classifier head's few hundred numbers).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from contracts import GraphFiles

EXTERNAL_DATA_MIN_BYTES = 1024  # smaller tensors stay inside the protobuf


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, those of subgraphs (If, Loop, Scan) included: they may read the outer graph's weights."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                yield from _nodes(sub)


def _rename_inputs(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    for node in _nodes(graph):
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]


def _drop_unread(graph: onnx.GraphProto) -> None:
    read = {name for node in _nodes(graph) for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)


def fold_weight_transposes(graph: onnx.GraphProto) -> int:
    """Replace ``Transpose(weight)`` by the transposed weight, once per weight and permutation; returns the
    Transpose nodes removed.

    The exporter keeps a Linear's weight transpose as a node when modules share the weight (folds on one frozen
    base), and the quantizer only quantizes a MatMul whose weight is a constant."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    folded = [node for node in graph.node if node.op_type == "Transpose" and node.input[0] in initializers]
    first: dict[tuple[str, tuple[int, ...] | None], str] = {}
    renamed = {}
    for node in folded:
        perm = next((tuple(a.ints) for a in node.attribute if a.name == "perm"), None)
        key = (node.input[0], perm)
        if key in first:
            renamed[node.output[0]] = first[key]
        else:
            first[key] = node.output[0]
            weight = numpy_helper.to_array(initializers[node.input[0]])
            graph.initializer.append(numpy_helper.from_array(np.transpose(weight, perm), node.output[0]))
        graph.node.remove(node)
    _rename_inputs(graph, renamed)
    _drop_unread(graph)
    return len(folded)


def share_identical_weights(graph: onnx.GraphProto) -> int:
    """Keep one initializer of each distinct content (type, shape and bytes); its duplicates' readers read it.
    Returns the bytes no longer stored."""
    first: dict[tuple, onnx.TensorProto] = {}
    renamed, saved = {}, 0
    for tensor in graph.initializer:
        data = numpy_helper.to_array(tensor)
        key = (tensor.data_type, data.shape, hashlib.sha256(data.tobytes()).digest())
        kept = first.setdefault(key, tensor)
        if kept is not tensor and np.array_equal(numpy_helper.to_array(kept), data):
            renamed[tensor.name] = kept.name
            saved += data.nbytes
    _rename_inputs(graph, renamed)
    for tensor in [t for t in graph.initializer if t.name in renamed]:
        graph.initializer.remove(tensor)
    return saved


def unshare_weights(graph: onnx.GraphProto, op_types: tuple[str, ...]) -> int:
    """Give each node of these types its own copy of a weight another node also reads; returns the copies made."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input if name in initializers)
    copies = 0
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        for i, name in enumerate(node.input):
            if readers.get(name, 0) > 1:
                readers[name] -= 1  # the last reader keeps the original
                copy = graph.initializer.add()
                copy.CopyFrom(initializers[name])
                copy.name = node.input[i] = f"{name}.{node.name or copies}.copy"
                copies += 1
    return copies


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write ``path`` and its weights to ``<path>.data`` (replacing both), and check it."""
    data = path.with_name(f"{path.name}.data")
    path.unlink(missing_ok=True)
    data.unlink(missing_ok=True)  # onnx appends to an existing external-data file
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=EXTERNAL_DATA_MIN_BYTES,
    )
    onnx.checker.check_model(str(path))


def compact(path: Path) -> int:
    """Rewrite the graph at ``path`` with each weight stored once, without the exporter's per-node debugging
    metadata (source stack traces, half the protobuf); returns the weight bytes saved."""
    model = onnx.load(str(path))
    for node in _nodes(model.graph):
        node.ClearField("metadata_props")
        node.ClearField("doc_string")
    fold_weight_transposes(model.graph)
    saved = share_identical_weights(model.graph)
    save(model, path)
    return saved


def graph_files(path: Path) -> GraphFiles:
    """The graph's file name and the external-data files its tensors name, as the manifest lists them."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = [*model.graph.initializer]
    tensors += [a.t for node in _nodes(model.graph) for a in node.attribute if a.HasField("t")]
    external = {ExternalDataInfo(t).location for t in tensors if uses_external_data(t)}
    return GraphFiles(file=path.name, external_data=sorted(external))
