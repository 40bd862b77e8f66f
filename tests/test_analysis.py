"""Parameter/MAC counts against torchvision's published numbers, shapes, plan structure."""

import numpy as np
import pytest

import portres
from portres import zoo
from portres.analysis import infer_shapes
from portres.rewrites import fold_batch_norm
from portres.zoo import default_input_size

# torchvision's model cards: parameters and "GFLOPS" (which count multiply-adds) at 224x224
TORCHVISION = {
    "resnet18": (11_689_512, 1.814), "resnet34": (21_797_672, 3.664), "resnet50": (25_557_032, 4.089),
    "resnet101": (44_549_160, 7.801), "resnet152": (60_192_808, 11.514),
    "resnext50_32x4d": (25_028_904, 4.230), "resnext101_32x8d": (88_791_336, 16.414),
    "resnext101_64x4d": (83_455_272, 15.460), "wide_resnet50_2": (68_883_240, 11.398),
    "wide_resnet101_2": (126_886_696, 22.753),
}
CIFAR = {"resnet20": 269_722, "resnet56": 853_018, "resnet110": 1_727_962}


@pytest.mark.parametrize("name", TORCHVISION)
def test_params_equal_torchvision_and_macs_within_half_percent(name):
    params, gmacs = TORCHVISION[name]
    s = portres.summary(portres.get(name), input_size=224)
    assert s.params == params
    assert abs(s.macs / 1e9 - gmacs) / gmacs < 0.005


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_option_a_counts(name):
    assert portres.summary(portres.get(name), input_size=32).params == CIFAR[name]


def test_plain_twin_has_the_same_parameters_as_its_resnet():
    assert portres.summary(portres.get("plain56"), 32).params == CIFAR["resnet56"]


def test_resnet50_summary_details():
    s = portres.summary(portres.get("resnet50"))
    assert s.buffers == sum(r.params for r in s.rows if r.op == "batch_norm") == 53_120  # mean+var vs weight+bias
    assert sum(r.params for r in s.rows) == s.params and sum(r.macs for r in s.rows) == s.macs
    stages = {g["stage"]: g for g in s.stages()}
    assert list(stages) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert stages["stem"]["output_shape"] == (64, 56, 56)
    assert stages["layer4"]["output_shape"] == (2048, 7, 7)
    assert s.rows[-1].output_shape == (1000,)


def test_macs_follow_input_size():
    small, large = (portres.summary(portres.get("resnet18"), n).macs for n in (224, 448))
    assert 3.99 < large / small < 4.0  # convs scale with pixels; the fc does not
    assert portres.summary(portres.get("resnet18"), (224, 112)).input_size == (224, 112)


def test_input_smaller_than_total_stride_is_rejected():
    plan = portres.make_plan(portres.get("resnet50"))
    assert plan.total_stride == 32
    with pytest.raises(ValueError, match="input 31x64 is too small for resnet50.*at least 32 pixels"):
        infer_shapes(plan, (31, 64))
    assert portres.make_plan(portres.get("resnet20")).total_stride == 4


def test_odd_sizes_follow_ceil_and_floor_rules():
    shapes = infer_shapes(portres.make_plan(portres.get("resnet50d")), 75)
    assert shapes["layer1.0.conv1"][1:] == (19, 19)
    assert shapes["layer2.0.downsample.0"][1:] == (10, 10)  # ceil-mode avg pool: ceil(19/2)
    assert shapes["layer2.0.conv2"][1:] == shapes["layer2.0.downsample.2"][1:]


@pytest.mark.parametrize("name", zoo.names())
def test_every_plan_is_consistent(name):
    spec = portres.get(name)
    plan = portres.make_plan(spec)
    names = [op.name for op in plan.ops]
    assert len(names) == len(set(names)), "op names are unique"
    shapes = infer_shapes(plan, default_input_size(spec))  # raises on any channel/shape mismatch
    assert shapes[plan.output] == (spec.num_classes,)
    assert [f for f, _ in plan.features] == ["stem"] + [f"layer{i + 1}" for i in range(len(spec.stages))]
    adds = sum(op.kind == "add" for op in plan.ops)
    assert adds == (sum(s.blocks for s in spec.stages) if spec.residual else 0)


def test_bn_folding_removes_every_conv_bn_pair_but_keeps_value_names():
    plan = portres.make_plan(portres.get("resnet50"))
    folded, params = fold_batch_norm(plan, portres.init_params(plan))
    assert not any(op.kind == "batch_norm" for op in folded.ops)
    assert {op.output for op in folded.ops} <= {op.output for op in plan.ops}
    assert all(op.layer.bias for op in folded.ops if op.kind == "conv2d")
    assert set(params) == set(folded.param_shapes())


def test_bn_folding_turns_preactivation_norms_into_channel_affines():
    plan = portres.make_plan(portres.get("resnetv2_50"))
    params = portres.init_params(plan, randomize_batch_norm=True)
    folded, folded_params = fold_batch_norm(plan, params)
    assert not any(op.kind == "batch_norm" for op in folded.ops)
    affine = [op.name for op in folded.ops if op.kind == "channel_affine"]
    assert "layer1.0.bn1" in affine and "final_bn" in affine and "layer1.0.bn2" not in affine
    assert set(folded_params) == set(folded.param_shapes())
    bn = {s: params[f"final_bn.{s}"].astype(np.float64) for s in ("weight", "bias", "running_mean", "running_var")}
    x = np.random.default_rng(0).standard_normal(bn["weight"].shape)
    expected = (x - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-5) * bn["weight"] + bn["bias"]
    got = x * folded_params["final_bn.scale"] + folded_params["final_bn.shift"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
