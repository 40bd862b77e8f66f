"""onnxruntime peer: the plan exported to ONNX and run by an ``InferenceSession``, so users can see
portres's backends next to the CPU inference engine they would otherwise deploy.

onnxruntime runs whole graphs, not primitives, so this backend's primitives take two kinds of
arrays. While :meth:`Backend.compile` traces the forward pass, they receive
:class:`~portres.interop.onnx.Value` s and hand them to the ONNX graph builder (the exporter's
code: one lowering, not two); the resulting graph (dynamic batch and spatial dims) becomes
one session, made on the first call. Called op by op on NumPy arrays (``model.features``,
``model.run_op``, the benchmark's per-op profile), each primitive runs a one-node session,
made once per primitive and attribute set, with weights fed as inputs.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np

try:
    import onnxruntime as ort
except ImportError as error:  # pragma: no cover - guarded by backends.unavailable_reason
    raise ImportError(f"the onnxruntime backend needs onnxruntime: pip install 'portres[onnx]' ({error})") from None

from portres.interop.onnx import OnnxGraphBuilder, Value

from .base import Forwarding

NAME = "onnxruntime"
FOLD_BATCH_NORM = True
DTYPES = ("float32", "float16")  # float16: onnxruntime's CPU kernels where it has them, casts elsewhere
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def devices() -> list[str]:
    available = set(ort.get_available_providers())
    return [device for device, provider in _PROVIDERS.items() if provider in available]


def info() -> dict:
    return {"framework": f"onnxruntime {ort.__version__} (onnx {importlib.metadata.version('onnx')})",
            "devices": devices(), "default_device": "cpu", "execution_providers": ort.get_available_providers(),
            "blas": "MLAS (onnxruntime's own kernels)"}


class Backend(Forwarding):
    """One onnxruntime session per traced forward pass; every primitive goes through ``call_primitive``
    (a graph node while tracing, a one-node session on NumPy arrays). ``nan_exact``: max pools spelled
    so that NaN and -inf propagate (see ``for_nonfinite_input``)."""

    name = NAME

    def __init__(self, device: str | None = None, dtype: str | None = None, intra_op_threads: int = 0,
                 nan_exact: bool = False):
        self.device = (device or "cpu").lower()
        if self.device not in _PROVIDERS:
            raise ValueError(f"onnxruntime devices are {', '.join(_PROVIDERS)}, not {device!r}")
        if self.device not in devices():
            raise ValueError(f"onnxruntime device {self.device!r} is not available here (its execution provider "
                             f"{_PROVIDERS[self.device]} is missing; available: {', '.join(devices())})")
        self.dtype = dtype or "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"the onnxruntime backend cannot compute in {self.dtype}: choose {' or '.join(DTYPES)}")
        self._np_dtype = np.dtype(self.dtype)
        # CPU after the device's provider: the fallback for any node that provider lacks
        self._providers = [_PROVIDERS[self.device]] + (["CPUExecutionProvider"] if self.device != "cpu" else [])
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = intra_op_threads  # 0: onnxruntime's default, one per physical core
        self._op_sessions: dict = {}  # (primitive, argument pattern) -> one-node session
        self.nan_exact = nan_exact
        self.intra_op_threads = intra_op_threads
        self._exact: Backend | None = None  # the nan_exact variant, made when first asked for
        self.threads = f"{intra_op_threads} intra-op threads" if intra_op_threads else \
            "onnxruntime default intra-op threads (one per physical core)"

    # -- arrays and parameters --

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=self._np_dtype)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def load_params(self, plan, params: dict) -> dict:
        return {name: np.ascontiguousarray(value, dtype=self._np_dtype) for name, value in params.items()}

    def options(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "intra_op_threads": self.intra_op_threads,
                "nan_exact": self.nan_exact}

    def for_nonfinite_input(self) -> Backend:
        """The variant that inputs holding NaN/inf run on (``portres.Model`` picks it): onnxruntime's
        MaxPool skips NaN and turns an all ``-inf`` window into the lowest finite float, so there max
        pools also pool a NaN mask and a ``-inf`` mask and restore both."""
        if self.nan_exact:
            return self
        if self._exact is None:
            self._exact = self.variant(nan_exact=True)
        return self._exact

    def session(self, model) -> ort.InferenceSession:
        """An InferenceSession for the ModelProto ``model`` on this backend's device."""
        return ort.InferenceSession(model.SerializeToString(), self._options, providers=self._providers)

    def compile(self, forward):
        """``forward`` traced into one ONNX graph on the first call, then run as one session.

        The graph is traced again only if a different params dict is passed (a Model always
        passes its own); batch, height and width stay dynamic, so one session serves every input.
        """
        state = {"params": None, "session": None}

        def run(params, x):
            if isinstance(x, Value):  # compiled inside another trace: keep tracing
                return forward(params, x)
            if state["params"] is not params:
                builder = OnnxGraphBuilder(self.dtype, param_names=params, nan_exact=self.nan_exact)
                traced = builder.input("input", ["batch", x.shape[1], "height", "width"])
                out = forward(params, traced)
                state["several"] = isinstance(out, tuple)  # stage outputs: one graph output each
                outputs = {f"output{i}": value for i, value in enumerate(out)} if state["several"] else {"logits": out}
                state["session"] = self.session(builder.finish(outputs))
                state["params"] = params  # held, so its id cannot be reused by another dict
            results = state["session"].run(None, {"input": x})
            return tuple(results) if state["several"] else results[0]

        return run

    # -- primitives (NCHW): graph nodes while tracing, one-node sessions on NumPy arrays --

    def call_primitive(self, primitive: str, *args):
        if any(isinstance(a, Value) for a in args):
            graph = next(a.graph for a in args if isinstance(a, Value))
            return getattr(graph, primitive)(*args)
        # arrays become graph inputs, so one session serves every weight; other arguments are attributes
        pattern = tuple(("array", np.ndim(a)) if isinstance(a, np.ndarray) else a for a in args)
        key = (primitive, pattern)
        if key not in self._op_sessions:
            builder = OnnxGraphBuilder(self.dtype, nan_exact=self.nan_exact)
            symbolic = [builder.input(f"a{i}", [None] * np.ndim(a)) if isinstance(a, np.ndarray) else a
                        for i, a in enumerate(args)]
            self._op_sessions[key] = self.session(builder.finish({"out": getattr(builder, primitive)(*symbolic)}))
        feeds = {f"a{i}": np.ascontiguousarray(a, dtype=self._np_dtype) for i, a in enumerate(args)
                 if isinstance(a, np.ndarray)}
        return self._op_sessions[key].run(None, feeds)[0]
