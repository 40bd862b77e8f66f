"""Foreign naming schemes (timm, Keras, mlx-image): round trips always, parity with the frameworks
that wrote them where those are installed, and the spec fields their models need.

Round trips export portres weights under a scheme with the inverse transforms and load them back
(explicit layout and "auto") exactly. Parity tests load the foreign framework's own model with
random weights through the same names and compare its logits with portres's float64 reference;
they skip cleanly where timm/torch, Keras (with JAX) or mlx-image are not installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import portres
from portres import backends, interop, parity
from portres.interop import keras as keras_scheme
from portres.spec import ResNetSpec, SpecError, StageSpec, StemSpec
from portres.weights import WeightsError, load_weights, save_weights

FRAMEWORKS = [name for name in backends.available() if name != "numpy"]
RESNETV2_50D = portres.resnet(50, name="resnetv2_50d", preactivation=True, stem=StemSpec(kind="deep"),
                              shortcut="avg_down")
# (spec, layout) pairs whose names the round trips check; every scheme and dialect is covered
ROUND_TRIPS = [
    ("resnet50d", "timm"), ("resnet26d", "timm"), ("resnetv2_50", "timm"), ("resnetv2_18", "timm"),
    (RESNETV2_50D, "timm"), ("keras_resnet50", "keras"), ("keras_resnet50v2", "keras"), ("keras_resnet101", "keras"),
    ("resnet50", "mlxim"), ("resnet18", "mlxim"), ("resnet50d", "mlxim"), ("resnet50", "torchvision"),
]


def spec_of(spec) -> ResNetSpec:
    return portres.get(spec) if isinstance(spec, str) else spec


def random_params(spec) -> dict[str, np.ndarray]:
    return portres.init_params(spec, seed=7, randomize_batch_norm=True)


def assert_same(loaded: dict, params: dict) -> None:
    assert list(loaded) == list(params)
    for name, value in params.items():
        assert loaded[name].dtype == np.float32 and np.array_equal(loaded[name], value), name


# -- transforms --------------------------------------------------------------------------------


@pytest.mark.parametrize("transform, portres_shape", [
    (interop.HWIO, (8, 3, 7, 5)), (interop.OHWI, (8, 3, 7, 5)), (interop.IN_OUT, (10, 6)),
    (interop.CONV_1X1, (10, 6)), (interop.IDENTITY, (4,)),
])
def test_transforms_invert_each_other_and_predict_the_foreign_shape(transform, portres_shape):
    value = np.random.default_rng(0).standard_normal(portres_shape).astype(np.float32)
    foreign = transform.from_portres(value)
    assert foreign.shape == transform.foreign_shape(portres_shape)
    assert np.array_equal(transform.to_portres(foreign), value)


def test_foreign_layouts_are_the_frameworks_own():
    oihw = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert np.array_equal(interop.HWIO.from_portres(oihw)[1, 2, 0, 1], oihw[1, 0, 1, 2])  # [h, w, in, out]
    assert np.array_equal(interop.OHWI.from_portres(oihw)[1, 2, 3, 0], oihw[1, 0, 2, 3])  # [out, h, w, in]
    assert interop.CONV_1X1.from_portres(np.zeros((10, 6))).shape == (10, 6, 1, 1)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, layout", ROUND_TRIPS)
def test_round_trip_through_every_scheme_and_dialect(spec, layout):
    spec = spec_of(spec)
    params = random_params(spec)
    for scheme in interop.schemes(layout):
        foreign = interop.export_weights(params, spec, layout, scheme.dialect)
        assert_same(load_weights(foreign, spec, layout=layout), params)
        assert_same(load_weights(foreign, spec, layout="auto"), params)
        detected = interop.detect(foreign, spec)
        assert detected.name_map(spec) == scheme.name_map(spec)  # timm's resnet.py names are torchvision's


def test_round_trip_through_files(tmp_path):
    spec = portres.get("resnet18")
    params = random_params(spec)
    path = tmp_path / "mlxim_resnet18.safetensors"
    save_weights(path, interop.export_weights(params, spec, "mlxim"))
    assert_same(load_weights(path, spec, layout="mlxim"), params)
    assert_same(load_weights(path, spec, layout="auto"), params)
    path = tmp_path / "timm_resnetv2_18.npz"
    spec = portres.get("resnetv2_18")
    params = random_params(spec)
    save_weights(path, interop.export_weights(params, spec, "timm"))
    assert_same(load_weights(path, spec, layout="auto"), params)


def test_keras_variable_names_of_keras_2_load_too():
    spec = portres.get("keras_resnet50")
    params = random_params(spec)
    named = {f"{name}:0": value for name, value in interop.export_weights(params, spec, "keras").items()}
    assert_same(load_weights(named, spec, layout="keras"), params)
    assert_same(load_weights(named, spec, layout="auto"), params)


def write_keras_h5(path, arrays: dict, legacy: bool) -> None:
    """A Keras weights file as Keras writes it: legacy (layer_names/weight_names attributes, as the
    Keras Applications downloads) or Keras 3's .weights.h5 (dataset paths)."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as file:
        if not legacy:
            for name, value in arrays.items():
                file.create_dataset(name, data=value)
            return
        layers: dict[str, list[str]] = {}
        for name in arrays:
            layer, _ = name.split("/")
            layers.setdefault(layer, []).append(name + ":0")
        file.attrs["layer_names"] = [layer.encode() for layer in [*layers, "conv1_pad"]]  # a layer with no weights
        file.create_group("conv1_pad").attrs["weight_names"] = []
        for layer, weights in layers.items():
            group = file.create_group(layer)
            group.attrs["weight_names"] = [weight.encode() for weight in weights]
            for weight in weights:
                group.create_dataset(weight, data=arrays[weight[:-2]])


@pytest.mark.parametrize("name", ["keras_resnet50", "keras_resnet50v2"])
@pytest.mark.parametrize("legacy", [True, False])
def test_keras_h5_files_load(tmp_path, name, legacy):
    spec = portres.get(name)
    params = random_params(spec)
    arrays = interop.export_weights(params, spec, "keras", "" if legacy else "weights.h5")
    path = tmp_path / ("model.h5" if legacy else "model.weights.h5")
    write_keras_h5(path, arrays, legacy)
    assert_same(load_weights(path, spec, layout="keras"), params)
    assert_same(load_weights(path, spec, layout="auto"), params)
    assert portres.weights.describe_weights_file(path)  # the directory reads without a spec


def test_a_keras_file_without_h5py_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)
    with pytest.raises(WeightsError, match=r"needs h5py: pip install 'portres\[keras\]'"):
        load_weights(path, "keras_resnet50", layout="keras")


def test_not_an_h5_file_is_a_weights_error(tmp_path):
    pytest.importorskip("h5py")
    path = tmp_path / "model.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(WeightsError, match="not an HDF5 file"):
        load_weights(path, "keras_resnet50", layout="keras")


# -- bad input -------------------------------------------------------------------------------------


def test_mixed_schemes_are_one_error_listing_what_matched_which_scheme():
    spec = portres.get("resnetv2_50")
    params = random_params(spec)
    timm_names = interop.export_weights(params, spec, "timm")
    mixed = dict(list(timm_names.items())[:100] + list(params.items())[100:])
    with pytest.raises(WeightsError) as error:
        load_weights(mixed, spec, layout="auto")
    message = str(error.value)
    assert "do not all fit any known naming scheme for resnetv2_50" in message
    for line in ("torchvision: 151 of 251 given names match", "timm: 100 of 251 given names match"):
        assert line in message, message
    assert "keras: 0 of 251" in message and "mlxim:" in message and "mixed in one source" in message
    assert "not its names: stem.conv.weight" in message  # examples of what did not match


def test_a_scheme_that_has_no_name_for_a_layer_says_so():
    spec = portres.get("resnet50d")
    with pytest.raises(WeightsError, match=r"cannot name resnet50d's weights: .*no layer for conv1.0"):
        load_weights(random_params(spec), spec, layout="keras")
    message = str(pytest.raises(WeightsError, load_weights, {"x": np.zeros(1)}, spec, layout="auto").value)
    assert "keras: not applicable" in message and "keras (weights.h5): not applicable" in message


def test_an_explicit_layout_reports_misfits_in_its_own_names():
    spec = portres.get("keras_resnet50")
    arrays = interop.export_weights(random_params(spec), spec, "keras")
    arrays["conv1_conv/kernel"] = arrays["conv1_conv/kernel"].transpose(3, 2, 0, 1)  # OIHW left unconverted
    del arrays["predictions/bias"]
    arrays["predictions/extra"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError) as error:
        load_weights(arrays, spec, layout="keras")
    message = str(error.value)
    assert "missing (1): predictions/bias" in message
    assert "unexpected (1): predictions/extra" in message
    assert "conv1_conv/kernel: shape [64, 3, 7, 7], expected [7, 7, 3, 64]" in message


def test_unknown_layout_and_duplicate_spellings_are_rejected():
    spec = portres.get("keras_resnet50")
    with pytest.raises(ValueError, match="layout='tf' must be one of 'torchvision', 'timm', 'keras', 'mlxim', 'auto'"):
        load_weights({}, spec, layout="tf")
    arrays = interop.export_weights(random_params(spec), spec, "keras")
    arrays["conv1_conv/kernel:0"] = arrays["conv1_conv/kernel"]
    with pytest.raises(WeightsError, match="'conv1_conv/kernel' twice"):
        load_weights(arrays, spec, layout="keras")


def test_names_fitting_two_schemes_differently_are_ambiguous():
    # a made-up scheme that reads torchvision's names with the kernels transposed
    flipped = interop.Scheme("torchvision", "flipped", __name__, "flipped_map")
    spec = portres.get("resnet18")
    names = list(portres.make_plan(spec).param_shapes())
    real = interop.SCHEMES
    try:
        interop.SCHEMES = (*real, flipped)
        with pytest.raises(WeightsError, match=r"fit several naming schemes .*pass layout= to choose"):
            interop.detect(names, spec)
    finally:
        interop.SCHEMES = real


def flipped_map(plan):
    return {name: (name, interop.OHWI if len(shape) == 4 else interop.IDENTITY)
            for name, (shape, _) in plan.param_shapes().items()}


# -- the spec fields foreign models need -----------------------------------------------------------


TINY = {"stages": (StageSpec(2, 4, 2), StageSpec(2, 8, 2)), "stem": StemSpec(width=8), "num_classes": 5}


@pytest.mark.parametrize("changes, message", [
    ({"stage_stride_at": "middle"}, "stage_stride_at='middle' must be one of 'first', 'last'"),
    ({"stride_only_shortcut": "pool"}, "stride_only_shortcut='pool' must be one of 'project', 'subsample'"),
    ({"conv_bias": True}, "conv_bias=True must be one of 'none', 'all', 'unnormalized'"),
    ({"stride_only_shortcut": "subsample", "shortcut": "C"}, "contradicts shortcut='C'"),
])
def test_new_fields_are_validated(changes, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ResNetSpec(name="bad", **{**TINY, **changes})


def test_stem_max_pool_padding_is_validated():
    with pytest.raises(SpecError, match="stem.max_pool_padding='same' must be one of 'neg_inf', 'zero'"):
        StemSpec(max_pool_padding="same")
    with pytest.raises(SpecError, match="stem.max_pool_padding='zero' needs stem.max_pool=true"):
        StemSpec(max_pool=False, max_pool_padding="zero")
    with pytest.raises(SpecError, match="stem.max_pool_padding='zero' needs stem.max_pool=true"):
        ResNetSpec.from_dict({"name": "x", "stages": [{"blocks": 1, "width": 4}],
                              "stem": {"max_pool": False, "max_pool_padding": "zero"}})


@pytest.mark.parametrize("name", ["keras_resnet50", "keras_resnet152v2", "resnet26d"])
def test_new_presets_round_trip_through_json(name):
    spec = portres.get(name)
    assert ResNetSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("name, params", [
    # trainable parameters as the frameworks count them (Keras: trainable_weights; timm: parameters())
    ("keras_resnet50", 25_583_592), ("keras_resnet101", 44_601_832), ("keras_resnet152", 60_268_520),
    ("keras_resnet50v2", 25_568_360), ("keras_resnet101v2", 44_577_896), ("keras_resnet152v2", 60_236_904),
    ("resnet26d", 16_014_408), ("resnet50d", 25_576_264), ("resnetv2_50", 25_549_352),
])
def test_parameter_counts_match_the_frameworks(name, params):
    assert portres.summary(portres.get(name)).params == params


def test_stage_stride_at_last_strides_each_stages_last_block():
    plan = portres.make_plan(ResNetSpec(name="t", block="preact_bottleneck", stage_stride_at="last",
                                        stride_only_shortcut="subsample", **TINY))
    strides = {op.name: op.layer.stride for op in plan.ops if op.kind == "conv2d" and op.name.endswith("conv2")}
    assert strides == {"layer1.0.conv2": 1, "layer1.1.conv2": 2, "layer2.0.conv2": 1, "layer2.1.conv2": 2}
    # the strided blocks keep their channels: their shortcut subsamples instead of projecting
    assert {op.name for op in plan.ops if op.kind == "subsample"} == {"layer1.1.shortcut.subsample",
                                                                      "layer2.1.shortcut.subsample"}
    assert {op.name for op in plan.ops if op.name.endswith("downsample.0")} == {"layer1.0.downsample.0",
                                                                               "layer2.0.downsample.0"}


def test_conv_bias_policies():
    def biased(**fields):
        plan = portres.make_plan(ResNetSpec(name="t", **{**TINY, **fields}))
        return sorted(op.name for op in plan.ops if op.kind == "conv2d" and op.layer.bias)

    assert biased() == []
    assert len(biased(conv_bias="all")) == 1 + 4 * 3 + 2  # stem, three convs in each of 4 blocks, two projections
    assert biased(conv_bias="unnormalized") == []  # post-activation: a BN reads every conv
    assert biased(block="preact_bottleneck", conv_bias="unnormalized") == [  # Keras ResNetV2's biased convs
        "conv1", "layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer2.0.conv3",
        "layer2.0.downsample.0", "layer2.1.conv3"]


def test_zero_padded_max_pool_differs_only_where_the_pool_reads_negative_values():
    reference = backends.load("numpy").Backend()
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9))
    zero = reference.max_pool(reference.zero_pad(x, 1), 3, 2, 0)
    neg_inf = reference.max_pool(x, 3, 2, 1)
    assert zero.shape == neg_inf.shape and not np.array_equal(zero, neg_inf)
    relu = np.maximum(x, 0)  # why Keras' v1 stem (pool after ReLU) keeps -inf padding in its spec
    assert np.array_equal(reference.max_pool(reference.zero_pad(relu, 1), 3, 2, 0), reference.max_pool(relu, 3, 2, 1))


def test_zero_pad_backward_matches_finite_differences():
    reference = backends.load("numpy").Backend()
    rng = np.random.default_rng(1)
    x, weights = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 6, 7))
    grad = reference.zero_pad_backward(weights, 1)
    step, numeric = 1e-6, np.zeros_like(x)
    for index in np.ndindex(x.shape):
        bumped = x.copy()
        bumped[index] += step
        numeric[index] = ((reference.zero_pad(bumped, 1) - reference.zero_pad(x, 1)) * weights).sum() / step
    assert np.allclose(grad, numeric, atol=1e-6)


KERAS_V2_LIKE = ResNetSpec(name="keras_v2_like", block="preact_bottleneck", stage_stride_at="last",
                           stride_only_shortcut="subsample", conv_bias="unnormalized", bn_eps=1.001e-5,
                           stem=StemSpec(width=8, max_pool_padding="zero"),
                           stages=(StageSpec(2, 4, 2), StageSpec(2, 8, 1)), num_classes=5)
KERAS_V1_LIKE = ResNetSpec(name="keras_v1_like", bottleneck_stride_at="1x1", conv_bias="all", bn_eps=1.001e-5,
                           stem=StemSpec(width=8), stages=(StageSpec(1, 4, 1), StageSpec(2, 8, 2)), num_classes=5)


@pytest.mark.parametrize("backend", FRAMEWORKS)
@pytest.mark.parametrize("spec", [KERAS_V2_LIKE, KERAS_V1_LIKE], ids=lambda spec: spec.name)
def test_new_fields_agree_with_the_reference_on_every_backend(spec, backend):
    images, params = parity.parity_case(spec, 16, batch=2, seed=3)
    reference = parity.Reference(spec, images, params)
    result = parity.compare(portres.build(spec, backend, params), images, reference)
    assert result.passed, (result.logits_error, result.stage_errors)


# tinygrad compiles a backward for minutes here; like tests/test_gradients.py, it runs with PORTRES_FULL_ZOO=1
@pytest.mark.parametrize("backend", [b for b in backends.available(training=True) if b != "numpy"
                                     and (b != "tinygrad" or os.environ.get("PORTRES_FULL_ZOO"))])
def test_new_fields_train_with_the_reference_gradients(backend):
    from portres.training import parity as grad_parity
    from portres.training.grads import loss_and_grads

    spec = KERAS_V2_LIKE
    images, labels, params = grad_parity.gradient_case(spec, 16, batch=4, seed=0)
    reference = loss_and_grads(spec, "numpy", params, images, labels, dtype="float64")
    computed = loss_and_grads(spec, backend, params, images, labels, dtype="float64")
    result = grad_parity.compare_grads(grad_parity.GradParityResult(backend, "-", "float64"), reference, computed,
                                       portres.make_plan(spec))
    assert result.passed, result.to_dict()
    assert {"conv1.bias", "layer1.0.conv3.bias", "layer1.0.downsample.0.bias"} <= set(computed[1])


# -- parity with the frameworks themselves (skipped where they are not installed) ----------------------


def keras_module():
    os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 on CPU; the default (TensorFlow) is not required
    keras = pytest.importorskip("keras")
    if int(keras.__version__.split(".")[0]) < 3:
        pytest.skip("Keras 3 is needed (variable paths, .weights.h5)")
    pytest.importorskip("h5py")
    return keras


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' JAX arrays and NumPy 2's copy keyword
@pytest.mark.parametrize("name, application", [("keras_resnet50", "ResNet50"), ("keras_resnet50v2", "ResNet50V2")])
def test_keras_applications_parity(tmp_path, name, application):
    keras = keras_module()
    spec = portres.get(name)
    size = 64
    model = getattr(keras.applications, application)(weights=None, input_shape=(size, size, 3),
                                                      classifier_activation=None)
    images, params = parity.parity_case(spec, size, batch=2, seed=0)
    named = interop.export_weights(params, spec, "keras")
    assert {variable.path for variable in model.weights} == set(named)
    for variable in model.weights:
        variable.assign(named[variable.path])
    logits = np.asarray(model.predict(images.transpose(0, 2, 3, 1), verbose=0), np.float64)  # Keras is NHWC
    reference = portres.build(spec, "numpy", params)(images)
    assert parity.relative_error(logits, reference) < 1e-4  # Keras computes in float32
    model.save_weights(tmp_path / "model.weights.h5")  # positional names: checks the layer order
    assert_same(load_weights(tmp_path / "model.weights.h5", spec, layout="auto"), params)
    import h5py
    from keras.src.legacy.saving import legacy_h5_format  # Keras 2's named format, as the pretrained files

    with h5py.File(tmp_path / "legacy.h5", "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    assert_same(load_weights(tmp_path / "legacy.h5", spec, layout="keras"), params)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' JAX arrays and NumPy 2's copy keyword
@pytest.mark.parametrize("name, application", [
    ("keras_resnet101", "ResNet101"), ("keras_resnet152", "ResNet152"), ("keras_resnet101v2", "ResNet101V2"),
    ("keras_resnet152v2", "ResNet152V2")])
def test_keras_layer_names_shapes_and_order_of_the_deeper_applications(name, application):
    keras = keras_module()
    plan = portres.make_plan(name)
    model = getattr(keras.applications, application)(weights=None, input_shape=(32, 32, 3))
    shapes = plan.param_shapes()
    expected = {key: transform.foreign_shape(shapes[portres_name][0])
                for key, (portres_name, transform) in keras_scheme.name_map(plan).items()}
    assert {variable.path: tuple(variable.shape) for variable in model.weights} == expected
    weighted = ("Conv2D", "BatchNormalization", "Dense")
    ours = [layer.name for layer in keras_scheme.keras_layer_order(keras_scheme.keras_graph(plan))
            if layer.kind in weighted]
    assert ours == [layer.name for layer in model.layers if type(layer).__name__ in weighted]


def timm_case(timm_name: str, spec):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    model = timm.create_model(timm_name, pretrained=False).eval().double()
    images, params = parity.parity_case(spec, 64, batch=2, seed=0)
    named = interop.export_weights(params, spec, "timm")
    state = model.state_dict()
    counters = {key: value for key, value in state.items() if key.endswith("num_batches_tracked")}
    assert set(state) - set(counters) == set(named)
    model.load_state_dict({**{k: torch.from_numpy(v.astype(np.float64)) for k, v in named.items()}, **counters})
    with torch.no_grad():
        logits = model(torch.from_numpy(images.astype(np.float64))).numpy()
    return model, images, params, logits


@pytest.mark.parametrize("timm_name, spec", [("resnet50d", "resnet50d"), ("resnet26d", "resnet26d"),
                                             ("resnetv2_50", "resnetv2_50"), ("resnetv2_50d", RESNETV2_50D)])
def test_timm_parity(timm_name, spec):
    spec = spec_of(spec)
    model, images, params, logits = timm_case(timm_name, spec)
    reference = portres.build(spec, "numpy", params)(images)
    assert parity.relative_error(logits, reference) < 1e-10  # both in float64
    state = {key: value.float().numpy() for key, value in model.state_dict().items()}
    assert_same(load_weights(state, spec, layout="auto"), params)  # timm's own state_dict, counters and all


@pytest.mark.parametrize("name, block, layers", [("resnet50", "Bottleneck", [3, 4, 6, 3]),
                                                 ("resnet18", "BasicBlock", [2, 2, 2, 2])])
def test_mlx_image_parity(tmp_path, name, block, layers):
    pytest.importorskip("mlx.core")
    resnet = pytest.importorskip("mlxim.model.resnet.resnet")
    import mlx.core as mx
    from mlx.utils import tree_flatten

    spec = portres.get(name)
    model = resnet.ResNet(getattr(resnet, block), layers)
    model.eval()
    images, params = parity.parity_case(spec, 64, batch=2, seed=0)
    model.load_weights([(key, mx.array(value)) for key, value in interop.export_weights(params, spec, "mlxim").items()],
                       strict=True)
    logits = np.array(model(mx.array(images.transpose(0, 2, 3, 1))), np.float64)  # MLX is NHWC
    assert parity.relative_error(logits, portres.build(spec, "numpy", params)(images)) < 1e-4
    path = str(tmp_path / "model.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})  # as mlxim saves
    assert_same(load_weights(path, spec, layout="auto"), params)


def test_a_gradient_zero_but_for_rounding_passes_and_a_wrong_one_fails():
    from portres.training import parity as grad_parity

    spec = KERAS_V1_LIKE  # every conv bias sits before a BN: its train-mode gradient is exactly 0
    plan = portres.make_plan(spec)
    rng = np.random.default_rng(0)
    names = grad_parity.trainable_names(plan)
    shapes = plan.param_shapes()
    reference = {name: rng.standard_normal(shapes[name][0]) for name in names}
    reference["layer2.1.conv2.bias"] = rng.standard_normal(shapes["layer2.1.conv2.bias"][0]) * 1e-17
    stats = {"bn1.running_mean": np.ones(8)}
    rounded = {**reference, "layer2.1.conv2.bias": reference["layer2.1.conv2.bias"] * -3}

    def result(grads):
        return grad_parity.compare_grads(grad_parity.GradParityResult("x", "-", "float64"), (1.0, reference, stats),
                                         (1.0, grads, stats), plan)

    assert result(rounded).passed
    wrong = {**reference, "layer2.1.conv2.bias": reference["layer2.1.conv2.bias"] + 1e-3}
    assert not result(wrong).passed and result(wrong).divergence.startswith("layer2.1.conv2.bias")
