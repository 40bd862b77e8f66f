"""Optimisers and schedules: one implementation on every backend's arrays, held against a float64
transcription of torch's documented algorithms and, where torch is installed, against torch.optim."""

import json
import math

import numpy as np
import pytest

import portres
from portres import backends
from portres.parity import relative_error
from portres.plan import make_plan
from portres.training import schedules as S
from portres.training.optim import SGD, AdamW, decay_all, from_config, no_decay_for_norms_and_biases

AVAILABLE = backends.available()
SHAPES = {"conv1.weight": (4, 3, 3, 3), "bn1.weight": (4,), "bn1.bias": (4,), "fc.weight": (5, 4), "fc.bias": (5,)}
LRS = (0.1, 0.05, 0.02)  # SGD's, one per step: a changing lr must reach the update
# AdamW's, in its usual range: with a float32 step array, 1 - 0.999 ** step is off by ~1e-5 (float32 rounding
# of a number near 1, as in torch's capturable AdamW), so the parameters are off by ~1e-5 * lr (1.5e-6 at 0.1)
ADAMW_LRS = (0.01, 0.005, 0.002)
OPTIMIZERS = {
    "sgd": SGD(),
    "momentum": SGD(momentum=0.9),
    "nesterov_decay": SGD(momentum=0.9, nesterov=True, weight_decay=0.05),
    "momentum_decay_exempt": SGD(momentum=0.8, weight_decay=0.05, decay_filter=no_decay_for_norms_and_biases),
    "adamw": AdamW(weight_decay=0.05),
    "adamw_exempt": AdamW(betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, decay_filter=no_decay_for_norms_and_biases),
}


def lrs_for(opt):
    return LRS if isinstance(opt, SGD) else ADAMW_LRS


def random_case(seed=0, steps=3):
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    grads = [{name: rng.standard_normal(shape) for name, shape in SHAPES.items()} for _ in range(steps)]
    return params, grads


def reference(opt, params, grads, lrs):
    """torch's documented algorithms (torch.optim.SGD / AdamW pages), float64, one parameter at a time."""
    params, state = dict(params), {}
    for t, (g_all, lr) in enumerate(zip(grads, lrs), start=1):
        for name, p in params.items():
            g, decays = g_all[name], opt.weight_decay and opt.decay_filter(name, p.shape)
            if isinstance(opt, SGD):
                g = g + opt.weight_decay * p if decays else g
                if opt.momentum:
                    b = opt.momentum * state[f"momentum_buffer.{name}"] + g if t > 1 else g
                    state[f"momentum_buffer.{name}"] = b
                    g = g + opt.momentum * b if opt.nesterov else b
                params[name] = p - lr * g
            else:
                (beta1, beta2), p = opt.betas, p * (1 - lr * opt.weight_decay) if decays else p
                m = beta1 * state.get(f"exp_avg.{name}", 0) + (1 - beta1) * g
                v = beta2 * state.get(f"exp_avg_sq.{name}", 0) + (1 - beta2) * g * g
                state[f"exp_avg.{name}"], state[f"exp_avg_sq.{name}"] = m, v
                params[name] = p - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + opt.eps)
    return params, state


class Arrays:
    """One backend's arrays: ``array`` (from NumPy), ``scalar`` (a 0-d array of the params' dtype),
    ``count`` (a 0-d array for the step), ``numpy`` (back to NumPy)."""

    def __init__(self, name):
        self.name = name
        if name in ("numpy64", "numpy32"):
            dtype = np.float64 if name == "numpy64" else np.float32
            self.array = lambda x: np.asarray(x, dtype)
            self.scalar = self.count = lambda v: np.asarray(v, dtype)  # an int array would promote float32
            self.numpy = np.asarray
            return
        if name not in AVAILABLE:
            pytest.skip(f"{name} is not available here")
        if name == "tinygrad":
            from tinygrad import Tensor
            self.array, self.scalar, self.count = (lambda x: Tensor(np.asarray(x, np.float32))), Tensor, Tensor
            self.numpy = lambda a: a.numpy()
        elif name == "mlx":
            backends.load("mlx")  # preloads an optimized BLAS before mlx.core
            import mlx.core as mx
            self.array, self.scalar, self.count = (lambda x: mx.array(np.asarray(x, np.float32))), mx.array, mx.array
            self.numpy = np.asarray
        else:
            import torch
            self.array = lambda x: torch.tensor(np.asarray(x, np.float32))
            self.scalar, self.count = (lambda v: torch.tensor(v, dtype=torch.float32)), torch.tensor
            self.numpy = lambda a: a.numpy()


BACKENDS = ["numpy64", "numpy32", "tinygrad", "mlx", "torch"]


def to_backend(arrays, tree):
    return {name: arrays.array(value) for name, value in tree.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OPTIMIZERS)
@pytest.mark.parametrize("scalars", ["python", "array"])
def test_updates_match_the_float64_reference(backend, case, scalars):
    arrays, opt = Arrays(backend), OPTIMIZERS[case]
    params64, grads64 = random_case()
    params = to_backend(arrays, params64)
    state = opt.init(params)
    dtype = arrays.numpy(params["fc.weight"]).dtype
    lrs = lrs_for(opt)
    for step, lr in enumerate(lrs, start=1):
        lr_in, step_in = (lr, step) if scalars == "python" else (arrays.scalar(lr), arrays.count(step))
        params, state = opt.update(params, to_backend(arrays, grads64[step - 1]), state, lr_in, step_in)
        expected_params, expected_state = reference(opt, params64, grads64[:step], lrs[:step])
        assert set(state) == set(expected_state)
        if backend == "tinygrad":  # one schedule for all outputs instead of one per array
            type(params["fc.weight"]).realize(*params.values(), *state.values())
        for name, value in {**params, **state}.items():
            got = arrays.numpy(value)
            assert got.dtype == dtype, f"{name} changed dtype at step {step}"
            error = relative_error(got, {**expected_params, **expected_state}[name])
            assert error < 1e-6, f"{name} after step {step}: relative error {error:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_to_the_power_of_a_0d_array_step(backend):
    # AdamW's bias corrections are beta ** step: float.__pow__ must hand over to the array's __rpow__
    arrays = Arrays(backend)
    for step in (1, 2, 17):
        got = arrays.numpy(0.999 ** arrays.count(step))
        assert got.shape == () and math.isclose(float(got), 0.999 ** step, rel_tol=1e-6)


def test_update_is_pure_and_checks_its_inputs():
    params, grads = random_case(steps=1)
    opt = SGD(momentum=0.9, weight_decay=1e-2)
    state = opt.init(params)
    before = {name: value.copy() for name, value in {**params, **grads[0], **state}.items()}
    new_params, new_state = opt.update(params, grads[0], state, 0.1, 1)
    assert all(np.array_equal(before[n], v) for n, v in {**params, **grads[0], **state}.items())
    assert not np.array_equal(new_params["fc.weight"], params["fc.weight"])
    with pytest.raises(ValueError, match=r"grads do not match params: missing \['fc.bias'\]"):
        opt.update(params, {n: g for n, g in grads[0].items() if n != "fc.bias"}, state, 0.1, 1)
    with pytest.raises(ValueError, match="state do not match params.*opt.init"):
        opt.update(params, grads[0], AdamW().init(params), 0.1, 1)


def test_norms_and_biases_are_exempt_by_shape_in_a_deep_stem_network():
    shapes = {name: shape for name, (shape, trainable) in make_plan(portres.get("resnet50d")).param_shapes().items()
              if trainable}
    exempt = {name for name, shape in shapes.items() if not no_decay_for_norms_and_biases(name, shape)}
    assert {"conv1.1.weight", "conv1.4.bias", "bn1.weight", "layer1.0.bn2.bias", "fc.bias"} <= exempt
    assert exempt == {name for name, shape in shapes.items() if len(shape) == 1}
    assert "conv1.0.weight" not in exempt and "fc.weight" not in exempt
    assert all(decay_all(name, shape) for name, shape in shapes.items())


def custom_filter(name, shape):
    return not name.startswith("fc.")


def test_config_round_trips_through_json_and_refuses_mismatches():
    for opt in OPTIMIZERS.values():
        config = json.loads(json.dumps(opt.config()))
        assert from_config(config) == opt
    assert SGD(momentum=0.9).config() == {"optimizer": "SGD", "momentum": 0.9, "nesterov": False,
                                          "weight_decay": 0.0, "decay_filter": "decay_all"}
    custom = AdamW(decay_filter=custom_filter)
    with pytest.raises(ValueError, match="decay_filter='custom_filter'.*pass the function"):
        from_config(custom.config())
    assert from_config(custom.config(), decay_filter=custom_filter) == custom
    with pytest.raises(ValueError, match="decay_filter='decay_all'.*made with 'custom_filter'"):
        from_config(custom.config(), decay_filter=decay_all)
    with pytest.raises(ValueError, match="optimizer='Adam'"):
        from_config({"optimizer": "Adam"})
    with pytest.raises(ValueError, match=r"config=\['lr'\]: unknown SGD fields"):
        from_config({"optimizer": "SGD", "lr": 0.1})


@pytest.mark.parametrize("make, argument", [
    (lambda: SGD(momentum=-0.1), "momentum"),
    (lambda: SGD(nesterov=True), "nesterov"),
    (lambda: SGD(weight_decay=-1e-4), "weight_decay"),
    (lambda: AdamW(betas=(0.9, 1.0)), "betas"),
    (lambda: AdamW(betas=(0.9,)), "betas"),
    (lambda: AdamW(eps=-1.0), "eps"),
    (lambda: AdamW(weight_decay=-0.01), "weight_decay"),
])
def test_bad_optimizer_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"^{argument}="):
        make()


def test_a_compiled_mlx_step_takes_lr_and_step_as_arrays():
    arrays = Arrays("mlx")
    import mlx.core as mx
    opt, (params64, grads64) = AdamW(weight_decay=0.05), random_case()
    params, state = to_backend(arrays, params64), opt.init(to_backend(arrays, params64))
    step_fn = mx.compile(opt.update)
    for step, lr in enumerate(ADAMW_LRS, start=1):
        params, state = step_fn(params, to_backend(arrays, grads64[step - 1]), state, mx.array(lr), mx.array(step))
    expected, _ = reference(opt, params64, grads64, ADAMW_LRS)
    assert all(relative_error(np.asarray(params[n]), expected[n]) < 1e-6 for n in SHAPES)


def test_a_tinygrad_jit_step_takes_lr_and_step_as_tensors():
    arrays = Arrays("tinygrad")
    from tinygrad import Tensor, TinyJit
    opt, (params64, grads64) = AdamW(weight_decay=0.05), random_case(steps=4)
    lrs = (*ADAMW_LRS, 0.001)  # TinyJit captures at the 2nd call and replays the 3rd and 4th

    @TinyJit
    def step_fn(lr, step, **trees):  # TinyJit sees only top-level tensors: pass the dicts flattened
        params, grads, state = ({n[2:]: t for n, t in trees.items() if n[:2] == k} for k in ("p:", "g:", "s:"))
        params, state = opt.update(params, grads, state, lr, step)
        return [t.realize() for _, t in sorted({**params, **state}.items())]

    real = lambda t: t.clone().realize()  # jit inputs must be buffers, not folded constants such as p * 0
    params = {n: real(t) for n, t in to_backend(arrays, params64).items()}
    state = {n: real(t) for n, t in opt.init(params).items()}
    for step, lr in enumerate(lrs, start=1):
        trees = {f"{k}{n}": t for k, tree in (("p:", params), ("g:", to_backend(arrays, grads64[step - 1])),
                                              ("s:", state)) for n, t in tree.items()}
        outputs = dict(zip(sorted({**params, **state}), step_fn(real(Tensor(lr)), real(Tensor(step)), **trees)))
        params, state = ({n: real(outputs[n]) for n in tree} for tree in (params, state))
    expected, _ = reference(opt, params64, grads64, lrs)
    assert all(relative_error(params[n].numpy(), expected[n]) < 1e-6 for n in SHAPES)


# --- against torch.optim ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", OPTIMIZERS)
def test_updates_match_torch_optim(case):
    torch = pytest.importorskip("torch")
    opt, (params64, grads64) = OPTIMIZERS[case], random_case(seed=1)
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in params64.items()}
    groups = [{"params": [t for n, t in tensors.items() if decays == opt.decay_filter(n, tuple(t.shape))],
               "weight_decay": opt.weight_decay if decays else 0.0} for decays in (True, False)]
    groups = [group for group in groups if group["params"]]
    if isinstance(opt, SGD):
        torch_opt = torch.optim.SGD(groups, lr=0.0, momentum=opt.momentum, nesterov=opt.nesterov)
    else:
        torch_opt = torch.optim.AdamW(groups, lr=0.0, betas=opt.betas, eps=opt.eps)
    params, state = params64, opt.init(params64)
    for step, (lr, grads) in enumerate(zip(lrs_for(opt), grads64), start=1):
        for group in torch_opt.param_groups:
            group["lr"] = lr
        for name, t in tensors.items():
            t.grad = torch.tensor(grads[name])
        torch_opt.step()
        params, state = opt.update(params, grads, state, lr, step)
    for name, t in tensors.items():
        assert relative_error(params[name], t.detach().numpy()) < 1e-12
        for slot, value in torch_opt.state[t].items():
            if slot != "step":
                assert relative_error(state[f"{slot}.{name}"], value.numpy()) < 1e-12


def torch_lrs(make_scheduler, lr, steps):
    torch = pytest.importorskip("torch")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler, lrs = make_scheduler(torch.optim.lr_scheduler, optimizer), []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule, make_scheduler", [
    (S.multistep(0.1, [4, 9], gamma=0.2), lambda s, o: s.MultiStepLR(o, [4, 9], gamma=0.2)),
    (S.cosine(0.1, 12, final_lr=0.004), lambda s, o: s.CosineAnnealingLR(o, T_max=12, eta_min=0.004)),
    (S.warmup(S.cosine(0.1, 10), 5, start_factor=0.25), lambda s, o: s.SequentialLR(
        o, [s.LinearLR(o, start_factor=0.25, total_iters=5), s.CosineAnnealingLR(o, T_max=10)], milestones=[5])),
    (S.warmup(S.multistep(0.1, [3]), 2), lambda s, o: s.SequentialLR(
        o, [s.LinearLR(o, start_factor=0.1, total_iters=2), s.MultiStepLR(o, [3])], milestones=[2])),
])
def test_schedules_match_torch_lr_schedulers(schedule, make_scheduler):
    steps = 13  # cosines stop at their total_steps, where torch's would start to rise again
    expected = torch_lrs(make_scheduler, 0.1, steps)
    assert np.allclose([schedule(t) for t in range(steps)], expected, rtol=1e-12, atol=1e-15)


def test_schedules_closed_forms():
    assert [S.constant(0.1)(t) for t in (0, 10**6)] == [0.1, 0.1]
    assert [S.multistep(1.0, [3, 6])(t) for t in range(8)] == pytest.approx([1, 1, 1, .1, .1, .1, .01, .01])
    cos = S.cosine(0.1, 10, final_lr=0.01)
    assert [cos(0), cos(5), cos(10), cos(25)] == pytest.approx([0.1, 0.055, 0.01, 0.01])
    assert cos(3) == pytest.approx(0.01 + 0.09 * (1 + math.cos(0.3 * math.pi)) / 2)
    ramp = S.warmup(S.cosine(1.0, 10), 4, start_factor=0.2)
    assert [ramp(t) for t in (0, 2, 4, 9, 14)] == pytest.approx([0.2, 0.6, 1.0, 0.5, 0.0])
    assert S.warmup(S.constant(0.3), 0)(0) == 0.3
    assert repr(ramp) == ("Warmup(schedule=Cosine(lr=1.0, total_steps=10, final_lr=0.0), warmup_steps=4, "
                          "start_factor=0.2)")
    assert repr(S.multistep(0.1, [2, 5])) == "MultiStep(lr=0.1, milestones=(2, 5), gamma=0.1)"


def test_make_schedule_for_the_cli():
    assert S.make_schedule("constant", 0.1, 100) == S.constant(0.1)
    assert S.make_schedule("multistep", 0.1, 64000) == S.multistep(0.1, [32000, 48000])
    assert S.make_schedule("multistep", 0.1, 100, milestones=[50, 75], warmup_steps=10) == \
        S.warmup(S.multistep(0.1, [40, 65]), 10)
    assert S.make_schedule("cosine", 0.1, 100, warmup_steps=10, final_lr=1e-3, start_factor=0.5) == \
        S.warmup(S.cosine(0.1, 90, 1e-3), 10, 0.5)
    assert S.make_schedule("multistep", 0.1, 1) == S.multistep(0.1, [])  # no step at 50%/75% of a 1-step run


@pytest.mark.parametrize("make, argument", [
    (lambda: S.constant(-0.1), "lr"),
    (lambda: S.multistep(0.1, [5, 3]), "milestones"),
    (lambda: S.multistep(0.1, [0, 3]), "milestones"),
    (lambda: S.multistep(0.1, [3], gamma=0), "gamma"),
    (lambda: S.cosine(0.1, 0), "total_steps"),
    (lambda: S.cosine(0.1, 10, final_lr=0.2), "final_lr"),
    (lambda: S.warmup(0.1, 5), "schedule"),
    (lambda: S.warmup(S.constant(0.1), -1), "warmup_steps"),
    (lambda: S.warmup(S.constant(0.1), 5, start_factor=0), "start_factor"),
    (lambda: S.constant(0.1)(-1), "step"),
    (lambda: S.make_schedule("step", 0.1, 100), "schedule"),
    (lambda: S.make_schedule("cosine", 0.1, 0), "total_steps"),
    (lambda: S.make_schedule("cosine", 0.1, 100, warmup_steps=100), "warmup_steps"),
    (lambda: S.make_schedule("cosine", 0.1, 100, milestones=[50]), "milestones"),
    (lambda: S.make_schedule("multistep", 0.1, 100, milestones=[5, 50], warmup_steps=10), "milestones"),
])
def test_bad_schedule_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"^{argument}="):
        make()
