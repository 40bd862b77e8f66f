"""ONNX export: the plan walked by one more set of primitives, which write graph nodes.

:class:`OnnxGraphBuilder` has the primitive set every backend has (conv2d, batch_norm,
channel_affine, relu, max_pool, avg_pool, subsample, pad_channels, add, global_avg_pool,
linear), but its arrays are :class:`Value` s, names in a graph under construction: each
call appends ONNX nodes (and turns the NumPy weights it is given into initializers) and
returns the new value. :func:`export_onnx` drives it with :func:`portres.walker.run_plan`, the
walker every backend runs, so the architecture is not written a second time here; the
``onnxruntime`` backend traces its forward pass with the same builder.

    >>> import portres
    >>> from portres.interop.onnx import export_onnx
    >>> model = export_onnx("resnet50", path="resnet50.onnx")     # seeded weights; or params=...
    >>> [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    (['input'], ['logits'])

The graph takes ``input`` (NCHW, float32, batch dimension ``batch``; height and width
``height``/``width`` unless ``input_size`` pins them) and returns ``logits`` (``batch`` x
classes). onnx is imported only here, when an export starts (``pip install 'portres[onnx]'``).
"""

from __future__ import annotations

import json

import numpy as np

from ..backends.base import Forwarding

OPSET = 17  # default opset: every onnxruntime >= 1.12 runs it; what this builder writes is the same from 13 on
OPSETS = range(13, 22)  # opsets export_onnx writes (13: Pad/Slice/Reshape inputs; 21: onnxruntime 1.18's newest)
INPUT_NAME = "input"  # the graph's input: NCHW images
OUTPUT_NAME = "logits"  # the graph's output: batch x classes
_INT64_MAX = np.iinfo(np.int64).max  # Slice's "to the end"
_BOOL = 9  # onnx.TensorProto.BOOL


class OnnxUnavailable(RuntimeError):
    """The onnx package is missing; the message says how to install it."""


def _onnx():
    """The onnx module, imported on first use so that ``import portres`` never pulls it in."""
    try:
        import onnx
    except ImportError as error:
        raise OnnxUnavailable(f"ONNX export needs the onnx package: pip install 'portres[onnx]' ({error})") from None
    return onnx


_ELEMENT_TYPES = {"float32": 1, "float16": 10}  # onnx.TensorProto.FLOAT / FLOAT16


class Value:
    """A symbolic array: the name of one value in an :class:`OnnxGraphBuilder`'s graph.

    Supports ``+`` and ``*`` with another Value, a NumPy array or a Python number (each adds
    one node), so code written over arrays' operators traces too.
    """

    __slots__ = ("graph", "name")

    def __init__(self, graph: OnnxGraphBuilder, name: str):
        self.graph = graph  # the builder whose graph holds this value
        self.name = name  # the value's name in that graph

    def __repr__(self) -> str:
        return f"<onnx value {self.name!r}>"

    def __add__(self, other):
        return self.graph.add(self, other)

    def __mul__(self, other):
        return self.graph.binary("Mul", self, other)

    __radd__ = __add__
    __rmul__ = __mul__


class OnnxGraphBuilder:
    """Primitives that append ONNX nodes: a backend whose arrays are graph values.

    Weights arrive as NumPy arrays (they become initializers, named after ``param_names``
    when given: ``{name: array}``, the same dict the walker reads) or as Values (graph
    inputs: the onnxruntime backend's op-by-op mode). ``scope`` names the nodes that the
    next primitive call writes (the plan op being lowered).

        >>> builder = OnnxGraphBuilder()
        >>> x = builder.input("input", ["batch", 3, 8, 8])
        >>> model = builder.finish({"y": builder.relu(x)})
    """

    def __init__(self, dtype: str = "float32", param_names: dict | None = None, opset: int = OPSET,
                 nan_exact: bool = False):
        self.onnx = _onnx()
        if dtype not in _ELEMENT_TYPES:
            raise ValueError(f"ONNX graphs are built in {' or '.join(_ELEMENT_TYPES)}, not {dtype!r}")
        if opset not in OPSETS:
            raise ValueError(f"opset {opset} is not supported: choose {OPSETS.start}..{OPSETS.stop - 1} "
                             f"(default {OPSET})")
        self.dtype = dtype  # float type of every activation and weight
        self.element_type = _ELEMENT_TYPES[dtype]  # its onnx.TensorProto code
        self.opset = opset  # the default-domain opset the graph is written for
        self.nan_exact = nan_exact  # spell max pools so that NaN propagates (onnxruntime's MaxPool drops it)
        self.nodes: list = []  # NodeProtos in execution order
        self.inputs: list = []  # ValueInfoProtos of the graph inputs
        self.initializers: dict = {}  # name -> TensorProto
        self.scope: str | None = None  # prefix for the names of the nodes being written
        self._param_names = {id(array): name for name, array in (param_names or {}).items()}
        self._constants: dict = {}  # (id(array), shape) -> (array kept alive, initializer name)
        self._producer: dict = {}  # value name -> index in self.nodes of the node that writes it
        self._used: set[str] = set()  # every value and node name given out
        self._counts: dict[str, int] = {}  # base name -> the last suffix fresh() gave it

    # -- graph plumbing --

    def fresh(self, base: str) -> str:
        """A name not yet used in this graph, ``base`` itself when free."""
        name, count = base, self._counts.get(base, 1)
        while name in self._used:
            count += 1
            name = f"{base}_{count}"
        self._counts[base] = count
        self._used.add(name)
        return name

    def input(self, name: str, shape: list, dtype: str | None = None) -> Value:
        """Declare a graph input; ``shape`` entries are ints, dimension names (``"batch"``) or None."""
        element = _ELEMENT_TYPES[dtype] if dtype else self.element_type
        self._used.add(name)
        self.inputs.append(self.onnx.helper.make_tensor_value_info(name, element, shape))
        return Value(self, name)

    def constant(self, array, shape: tuple | None = None, name: str | None = None) -> str:
        """An initializer holding ``array`` (float arrays in the graph's dtype), reshaped to ``shape``."""
        array = np.asarray(array)
        key = (id(array), shape)
        if key in self._constants:
            return self._constants[key][1]
        base = name or self._param_names.get(id(array)) or (f"{self.scope}/const" if self.scope else "const")
        name = self.fresh(base)
        value = array.astype(self.dtype, copy=False) if array.dtype.kind == "f" else array
        if shape is not None:
            value = value.reshape(shape)
        self.initializers[name] = self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name)
        self._constants[key] = (array, name)
        return name

    def _ints(self, values) -> str:
        """An int64 vector initializer (pads, axes, steps), one per distinct value."""
        values = tuple(int(v) for v in values)
        key = ("int64", values)
        if key not in self._constants:
            name = self.fresh("int64." + "_".join("end" if v == _INT64_MAX else str(v) for v in values))
            self.initializers[name] = self.onnx.numpy_helper.from_array(np.asarray(values, np.int64), name)
            self._constants[key] = (None, name)
        return self._constants[key][1]

    def _operand(self, x, shape: tuple | None = None) -> str:
        """The name to feed a node: a Value (reshaped by a node when ``shape`` is given) or a constant."""
        if isinstance(x, Value):
            if shape is None:
                return x.name
            return self.node("Reshape", [x.name, self._ints(shape)]).name
        return self.constant(x, shape)

    def node(self, op_type: str, inputs: list[str], **attributes) -> Value:
        """Append one node; its output is a new Value named after the scope."""
        base = f"{self.scope}/{op_type}" if self.scope else op_type
        output = self.fresh(base)
        node = self.onnx.helper.make_node(op_type, inputs, [output], name=output, **attributes)
        self._producer[output] = len(self.nodes)
        self.nodes.append(node)
        return Value(self, output)

    def rename(self, value: Value, name: str, since: int = 0) -> Value:
        """``value`` under the name ``name`` (a plan value name, an output name).

        The node that wrote ``value`` is renamed in place when it is one of ``self.nodes[since:]``;
        otherwise (a graph input, an older value, a name already taken) an Identity node carries it.
        """
        if value.name == name:
            return value
        index = self._producer.get(value.name)
        if index is None or index < since or name in self._used:
            self._used.add(name)
            self._producer[name] = len(self.nodes)
            self.nodes.append(self.onnx.helper.make_node("Identity", [value.name], [name], name=name))
            return Value(self, name)
        self._used.add(name)
        for reader in self.nodes[index + 1:]:  # readers written since (within the same op) follow the rename
            for position, input_name in enumerate(reader.input):
                if input_name == value.name:
                    reader.input[position] = name
        self.nodes[index].output[0] = name
        self._producer[name] = self._producer.pop(value.name)
        return Value(self, name)

    def finish(self, outputs: dict, output_shapes: dict | None = None, doc: str = "",
               metadata: dict | None = None):
        """The ModelProto returning ``outputs`` (``{graph output name: Value}``), with opset and IR pinned."""
        helper = self.onnx.helper
        output_infos = []
        for name, value in outputs.items():
            self.rename(value, name)
            shape = (output_shapes or {}).get(name)
            output_infos.append(helper.make_tensor_value_info(name, self.element_type, shape))
        graph = helper.make_graph(self.nodes, "portres", self.inputs, output_infos,
                                  initializer=list(self.initializers.values()), doc_string=doc)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="portres",
                                  producer_version=_portres_version(), doc_string=doc)
        # the oldest IR version that can hold this opset: what older runtimes accept (17 -> IR 8)
        model.ir_version = helper.find_min_ir_version_for(opsets)
        for key, text in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, text
        return model

    # -- the primitives (NCHW) --

    def conv2d(self, x, weight, bias, stride, padding, groups):
        kernel = tuple(np.shape(weight)[2:]) if not isinstance(weight, Value) else None
        inputs = [self._operand(x), self._operand(weight)] + ([self._operand(bias)] if bias is not None else [])
        attributes = {"strides": [stride, stride], "pads": [padding] * 4, "group": groups}
        if kernel is not None:  # known for initializers; a weight fed as an input is read at run time
            attributes["kernel_shape"] = list(kernel)
        return self.node("Conv", inputs, **attributes)

    def batch_norm(self, x, weight, bias, mean, var, eps):
        inputs = [self._operand(v) for v in (x, weight, bias, mean, var)]
        return self.node("BatchNormalization", inputs, epsilon=float(eps))

    def channel_affine(self, x, scale, shift):
        scaled = self.node("Mul", [self._operand(x), self._operand(scale, (-1, 1, 1))])
        return self.node("Add", [scaled.name, self._operand(shift, (-1, 1, 1))])

    def relu(self, x):
        return self.node("Relu", [self._operand(x)])

    def max_pool(self, x, kernel_size, stride, padding):
        window = {"kernel_shape": [kernel_size] * 2, "strides": [stride] * 2, "pads": [padding] * 4}
        pooled = self.node("MaxPool", [self._operand(x)], **window)
        if not self.nan_exact:
            return pooled
        # onnxruntime's MaxPool skips NaN and starts from the lowest finite float: a window holding a NaN
        # must give NaN and one of only -inf must give -inf, as max does everywhere else
        x = self._operand(x)

        def window_has(mask: Value) -> Value:  # true where any pixel in the window is
            as_float = self.node("Cast", [mask.name], to=self.element_type)
            return self.node("Cast", [self.node("MaxPool", [as_float.name], **window).name], to=_BOOL)

        above_minus_inf = window_has(self.node("Not", [self.node("IsInf", [x], detect_positive=0).name]))
        minus_inf, nan = (self.constant(np.asarray(v, self.dtype)) for v in (-np.inf, np.nan))
        pooled = self.node("Where", [above_minus_inf.name, pooled.name, minus_inf])
        return self.node("Where", [window_has(self.node("IsNaN", [x])).name, nan, pooled.name])

    def avg_pool(self, x, kernel_size, stride):
        # ceil mode, dividing a partial edge window by the pixels it covers (portres's AvgPool)
        return self.node("AveragePool", [self._operand(x)], kernel_shape=[kernel_size] * 2, strides=[stride] * 2,
                         ceil_mode=1, count_include_pad=0)

    def subsample(self, x, stride):
        starts, ends = self._ints([0, 0]), self._ints([_INT64_MAX, _INT64_MAX])
        return self.node("Slice", [self._operand(x), starts, ends, self._ints([2, 3]), self._ints([stride, stride])])

    def pad_channels(self, x, before, after):
        # pads list every axis's start, then every axis's end: (N, C, H, W)
        return self.node("Pad", [self._operand(x), self._ints([0, before, 0, 0, 0, after, 0, 0])], mode="constant")

    def zero_pad(self, x, padding):
        # pads list every axis's start, then every axis's end: (N, C, H, W)
        pads = self._ints([0, 0, padding, padding, 0, 0, padding, padding])
        return self.node("Pad", [self._operand(x), pads], mode="constant")

    def add(self, x, y):
        return self.binary("Add", x, y)

    def binary(self, op_type: str, x, y):
        """An elementwise node of two operands; a Python number becomes a scalar constant."""
        if isinstance(y, (int, float)):
            y = np.asarray(y, self.dtype)
        if isinstance(x, (int, float)):
            x = np.asarray(x, self.dtype)
        return self.node(op_type, [self._operand(x), self._operand(y)])

    def global_avg_pool(self, x):
        pooled = self.node("GlobalAveragePool", [self._operand(x)])
        return self.node("Flatten", [pooled.name], axis=1)

    def linear(self, x, weight, bias):
        return self.node("Gemm", [self._operand(x), self._operand(weight), self._operand(bias)], transB=1)




class _Scoped(Forwarding):
    """The builder as :func:`run_plan` sees it during an export: each op's nodes are named after
    the op, and its output value gets the plan's value name (``layer1.0.bn1``), so the graph
    reads like the plan and stage outputs can be found by name."""

    name = "onnx export"

    def __init__(self, builder: OnnxGraphBuilder):
        self.builder = builder  # where the nodes go
        self.op = None  # the plan op being lowered
        self.first_node = 0  # index of the op's first node in builder.nodes

    def before_op(self, op, args) -> None:
        self.op, self.first_node = op, len(self.builder.nodes)
        self.builder.scope = op.name

    def call_primitive(self, primitive: str, *args):
        out = getattr(self.builder, primitive)(*args)
        return self.builder.rename(out, self.op.output, since=self.first_node)


def trace_plan(plan, params: dict, *, dtype: str = "float32", opset: int = OPSET, input_size=None,
               keep: tuple[str, ...] = (), nan_exact: bool = False, features: bool = False):
    """The ONNX ModelProto computing ``plan`` with ``params`` (NumPy arrays, taken as given).

    ``keep`` adds plan values (e.g. stage outputs) as extra graph outputs under their own names.
    ``features``: the graph's outputs are the stem's and each stage's output instead of the logits,
    named ``stem``, ``layer1``, ... (a backbone; the graph stops at the last stage).
    ``input_size`` (an int or (height, width)) pins the spatial dims; None leaves them dynamic.
    """
    from ..plan import INPUT
    from ..walker import run_plan

    builder = OnnxGraphBuilder(dtype, param_names=params, opset=opset, nan_exact=nan_exact)
    if input_size is None:
        height, width = "height", "width"
    else:
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    x = builder.input(INPUT_NAME, ["batch", plan.spec.in_channels, height, width])
    scoped = _Scoped(builder)
    wanted = dict(plan.features) if features else {OUTPUT_NAME: plan.output}  # graph output name -> plan value
    walked = plan.truncated(wanted.values()) if features else plan
    values = run_plan(walked, scoped, params, x, keep=(*wanted.values(), *keep), before_op=scoped.before_op)
    builder.scope = None
    outputs = {name: values[value] for name, value in wanted.items()}
    outputs.update({name: values[name] for name in keep if name not in (plan.output, INPUT, *outputs)})
    spec = plan.spec
    if features:
        shapes = {info["name"]: ["batch", info["channels"], f"{info['name']}_height", f"{info['name']}_width"]
                  for info in plan.feature_info()}
        what = f"stage outputs {', '.join(wanted)}"
    else:
        shapes = {OUTPUT_NAME: ["batch", plan.shapes(plan.total_stride)[plan.output][0]]}  # classes, or pooled
        what = "logits" if spec.num_classes else "pooled features (headless)"
    return builder.finish(outputs, output_shapes=shapes, doc=f"portres {spec.name}: NCHW images in, {what} out",
                          metadata={"portres.spec": spec.to_json(None), "portres.input_layout": "NCHW"})


def export_onnx(spec, params=None, path=None, *, fold_batch_norm: bool = True, opset: int = OPSET,
                input_size=None, seed: int = 0, features: bool = False):
    """``spec`` (a ResNetSpec or preset name) as a checked ONNX model; written to ``path`` if given.

    ``params``: a mapping or weights file, loaded strictly (``None``: ``init_params(spec, seed)``).
    ``fold_batch_norm``: fold eval-mode BN into the convs (False keeps BatchNormalization nodes).
    ``features``: a backbone graph whose outputs are the stage outputs (``stem``, ``layer1``, ...).
    The model passes ``onnx.checker.check_model(full_check=True)`` before it is returned or
    written; the file is replaced atomically (a crash leaves the old file or the new one).

        >>> model = export_onnx("resnet18", "resnet18.safetensors", "resnet18.onnx")
    """
    from ..model import plan_and_params
    from ..tensorfiles import atomic_write

    onnx = _onnx()
    spec, plan, params = plan_and_params(spec, params, seed=seed, fold=fold_batch_norm)
    model = trace_plan(plan, params, opset=opset, input_size=input_size, features=features)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)  # value_info for viewers
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        data = model.SerializeToString()
        atomic_write(path, lambda file: file.write(data))
    return model


def describe(model) -> dict:
    """Counts for reports: nodes by type, initializers, parameters, opset, IR version."""
    by_type: dict[str, int] = {}
    for node in model.graph.node:
        by_type[node.op_type] = by_type.get(node.op_type, 0) + 1
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"nodes": len(model.graph.node), "node_types": by_type, "initializers": len(model.graph.initializer),
            "initializer_values": parameters, "opset": opset, "ir_version": model.ir_version,
            "spec": json.loads(next((p.value for p in model.metadata_props if p.key == "portres.spec"), "null"))}


def _portres_version() -> str:
    from .. import __version__

    return __version__


__all__ = ["OPSET", "OPSETS", "OnnxGraphBuilder", "OnnxUnavailable", "Value", "describe", "export_onnx",
           "trace_plan"]
