"""Spec validation (every rule), JSON round-trip, the zoo registry."""

import dataclasses
import json

import pytest

import portres
from portres import zoo
from portres.plan import make_plan
from portres.spec import ResNetSpec, SpecError, StageSpec, StemSpec

BASE = dict(name="t", block="bottleneck", stages=(StageSpec(2, 16, 1), StageSpec(2, 32, 2)))


def make(**changes):
    return ResNetSpec(**{**BASE, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(name=""), "name=''"),
    (dict(name=3), "name=3"),
    (dict(stages=()), "stages=() must be a non-empty"),
    (dict(stages=(3,)), "stages[0]=3 must be a StageSpec"),
    (dict(block="dense"), "block='dense' must be one of"),
    (dict(shortcut="D"), "shortcut='D' must be one of"),
    (dict(bottleneck_stride_at="5x5"), "bottleneck_stride_at='5x5' must be one of"),
    (dict(groups=0), "groups=0 must be >= 1"),
    (dict(width_factor=0), "width_factor=0 must be >= 1"),
    (dict(width_factor=1.5), "width_factor=1.5 must be an integer"),
    (dict(num_classes=-1), "num_classes=-1 must be >= 0"),  # 0 is allowed: a headless network
    (dict(in_channels=0), "in_channels=0 must be >= 1"),
    (dict(residual="yes"), "residual='yes' must be true or false"),
    (dict(zero_init_last_bn=1), "zero_init_last_bn=1 must be true or false"),
    (dict(bn_eps=0.0), "bn_eps=0.0 must be a finite number > 0"),
    (dict(bn_eps=float("nan")), "bn_eps=nan must be a finite number > 0"),
    (dict(bn_eps="1e-5"), "bn_eps='1e-5' must be a finite number > 0"),
    (dict(width_per_group=0), "width_per_group=0 must be >= 1"),
    (dict(block="basic", width_per_group=4), "width_per_group=4 only applies to bottleneck blocks"),
    (dict(width_per_group=1), "gives a bottleneck width of 0"),
    (dict(groups=3), "groups=3 must divide the bottleneck width 16"),
    (dict(block="basic", groups=5), "groups=5 must divide the block width 16"),
    (dict(residual=False, zero_init_last_bn=True), "zero_init_last_bn=True needs residual=True"),
    (dict(block="preact_bottleneck", zero_init_last_bn=True), "does not apply to block='preact_bottleneck'"),
    (dict(block="basic", shortcut="A", stem=StemSpec(width=64)), "shortcut='A' cannot shrink channels"),
    (dict(stem="imagenet"), "stem='imagenet' must be a StemSpec"),
])
def test_every_validation_rule_names_field_value_and_rule(changes, message):
    with pytest.raises(SpecError) as caught:
        make(**changes)
    assert message in str(caught.value)


@pytest.mark.parametrize("args, message", [
    ((0, 16), "stage.blocks=0 must be >= 1"),
    ((1, -4), "stage.width=-4 must be >= 1"),
    ((1, 16, 0), "stage.stride=0 must be >= 1"),
    ((1, 16.5), "stage.width=16.5 must be an integer"),
    ((True, 16), "stage.blocks=True must be an integer"),
])
def test_stage_validation_at_construction(args, message):
    with pytest.raises(SpecError) as caught:
        StageSpec(*args)
    assert message in str(caught.value)


def test_stage_errors_from_json_name_the_stage_index():
    data = portres.get("resnet18").to_dict()
    data["stages"][2]["stride"] = 0
    with pytest.raises(SpecError, match=r"stages\[2\]: stage.stride=0 must be >= 1"):
        ResNetSpec.from_dict(data)


@pytest.mark.parametrize("field, value, message", [
    ("kind", "tiny", "stem.kind='tiny' must be one of"),
    ("width", 0, "stem.width=0 must be >= 1"),
    ("deep_width", -1, "stem.deep_width=-1 must be >= 1"),
    ("max_pool", "no", "stem.max_pool='no' must be true or false"),
])
def test_stem_validation(field, value, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StemSpec(**{field: value})


def test_issue_example_message_for_groups():
    spec = dict(BASE, stages=(StageSpec(1, 64, 1),), groups=3)
    with pytest.raises(SpecError, match="groups=3 must divide the bottleneck width 64"):
        ResNetSpec(**spec)


def test_a_valid_spec_is_frozen_and_hashable():
    spec = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.groups = 2
    assert hash(spec) == hash(make())


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_entry_round_trips_through_json(name):
    spec = portres.get(name)
    text = spec.to_json()
    assert ResNetSpec.from_json(text) == spec
    assert ResNetSpec.from_dict(json.loads(text)).to_dict() == spec.to_dict()


def test_from_dict_rejects_unknown_keys_everywhere():
    data = portres.get("resnet18").to_dict()
    with pytest.raises(SpecError, match=r"spec has unknown key\(s\) 'colour'; known keys: name, stages"):
        ResNetSpec.from_dict({**data, "colour": "red"})
    bad_stage = dict(data, stages=[{**data["stages"][0], "dilation": 2}])
    with pytest.raises(SpecError, match=r"stages\[0\] has unknown key\(s\) 'dilation'"):
        ResNetSpec.from_dict(bad_stage)
    with pytest.raises(SpecError, match=r"stem has unknown key\(s\) 'kernel'"):
        ResNetSpec.from_dict(dict(data, stem={"kernel": 7}))


def test_from_dict_reports_missing_and_malformed_parts():
    with pytest.raises(SpecError, match="missing the required field 'stages'"):
        ResNetSpec.from_dict({"name": "x"})
    with pytest.raises(SpecError, match=r"stages\[0\]: missing"):
        ResNetSpec.from_dict({"name": "x", "stages": [{"blocks": 1}]})
    with pytest.raises(SpecError, match="must be a non-empty list"):
        ResNetSpec.from_dict({"name": "x", "stages": []})
    with pytest.raises(SpecError, match="must be a JSON object"):
        ResNetSpec.from_dict([1, 2])
    with pytest.raises(SpecError, match="not valid JSON"):
        ResNetSpec.from_json("{name: ")


def test_from_dict_fills_defaults_for_hand_written_files():
    spec = ResNetSpec.from_dict({"name": "mine", "block": "basic", "stages": [{"blocks": 1, "width": 8}]})
    assert spec.shortcut == "B" and spec.stem == StemSpec() and spec.stages == (StageSpec(1, 8, 1),)


def test_zoo_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'resnet50' is already registered"):
        zoo.register(portres.get("resnet50"), "resnet")


def test_zoo_unknown_name_lists_closest():
    with pytest.raises(KeyError) as caught:
        portres.get("resnt50")
    assert "unknown preset 'resnt50'" in str(caught.value)
    assert "resnet50" in str(caught.value).split("closest:")[1]


def test_zoo_has_every_family_the_issue_asks_for():
    names = set(zoo.names())
    required = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
                "resnetv2_18", "resnetv2_34", "resnetv2_50", "resnetv2_101", "resnetv2_152",
                "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202", "plain20", "plain56"}
    assert required <= names
    assert any(portres.get(n).bottleneck_stride_at == "1x1" for n in names)
    resnet_d = [portres.get(n) for n in names if zoo.entry(n).family == "resnet_d"]
    assert resnet_d and all(s.stem.kind == "deep" and s.shortcut == "avg_down" for s in resnet_d)
    assert all(not portres.get(n).residual for n in names if n.startswith("plain"))
    assert all(portres.get(n).shortcut == "A" for n in names if zoo.entry(n).family == "cifar")


def test_resnet_convenience_builds_variants():
    spec = portres.resnet(50, shortcut="avg_down", stem=StemSpec(kind="deep"), bottleneck_stride_at="1x1")
    assert spec.name == "resnet50" and spec.shortcut == "avg_down" and spec.stem.kind == "deep"
    assert portres.resnet(18) == portres.get("resnet18")
    assert portres.resnet(34, preactivation=True).block == "preact_basic"
    with pytest.raises(SpecError, match="depth=42 must be one of 18, 34, 50, 101, 152"):
        portres.resnet(42)
    with pytest.raises(SpecError, match="unknown or fixed keyword"):
        portres.resnet(50, colour="red")


def test_cifar_depth_must_be_6n_plus_2():
    with pytest.raises(SpecError, match="depth=21 must be 6n\\+2"):
        zoo.cifar_resnet(21)
    assert sum(s.blocks for s in zoo.cifar_resnet(56).stages) == 27


def test_groups_must_divide_every_conv_input_too():
    # basic blocks with groups=2 after a 15-channel stem: summary used to print an impossible conv
    # (checked where the ops are made: make_plan, which every use of a spec goes through)
    with pytest.raises(SpecError, match=r"layer1\.0\.conv1 \(conv2d\): groups=2 does not divide its 15 input"):
        make_plan(ResNetSpec(name="odd", block="basic", groups=2, stem=StemSpec(width=15),
                             stages=(StageSpec(1, 16, 1),)))


@pytest.mark.parametrize("make, message", [
    (lambda: ResNetSpec(name="x", block="basic", stages=(StageSpec(10**9, 16, 1),)), "stage.blocks=1,000,000,000"),
    (lambda: ResNetSpec(name="x", block="basic", stages=(StageSpec(5_000, 16, 1), StageSpec(5_001, 16, 1))),
     "10,001 blocks in all exceed the limit"),
    (lambda: ResNetSpec(name="x", block="basic", stages=(StageSpec(1, 10**6, 1),)), "stage.width=1,000,000"),
    (lambda: ResNetSpec(name="x", block="bottleneck", stages=(StageSpec(1, 8192, 1),)), "32,768 channels"),
    (lambda: ResNetSpec(name="x", block="basic", stages=(StageSpec(1, 8, 1),), num_classes=10**9),
     "num_classes=1,000,000,000 exceeds"),
    (lambda: ResNetSpec(name="x", block="basic", stages=(StageSpec(1, 8, 1),) * 40), "40 stages exceed"),
])
def test_sane_upper_bounds_with_messages(make, message):
    with pytest.raises(SpecError, match=message):
        make()


def test_deeply_nested_json_is_a_spec_error_not_a_recursion_error():
    with pytest.raises(SpecError, match="nested too deeply"):
        ResNetSpec.from_json("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize("bad", [None, 3, 2.5, ["resnet50"]])
def test_preset_lookup_of_a_non_name_is_a_clear_error(bad):
    with pytest.raises(SpecError, match="preset name must be a string"):
        portres.get(bad)


def test_a_preset_name_is_accepted_wherever_a_spec_is():
    spec = portres.get("resnet20")
    assert portres.summary("resnet20", 32).params == portres.summary(spec, 32).params == 269_722
    assert portres.make_plan("resnet20") is portres.make_plan(spec)
    assert set(portres.init_params("resnet20")) == set(portres.init_params(spec))
    with pytest.raises(SpecError, match="expected a ResNetSpec or a preset name, got int"):
        portres.summary(5)
