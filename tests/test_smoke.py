"""Each framework backend runs one small forward pass in a child process.

A native crash (SIGILL from a BLAS built for another CPU, a segfault in a kernel) kills the
process it happens in. Here it fails one test that names the signal, instead of taking the
whole pytest run down with it.
"""

import signal
import subprocess
import sys
import textwrap

import pytest

from portres import backends

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import portres
    from portres import parity, zoo
    spec = zoo.cifar_resnet(8)  # the smallest CIFAR ResNet: every kind of op, few kernels to compile
    images, params = parity.parity_case(spec, 16, batch=2, seed=0)
    out = portres.build(spec, sys.argv[1], params)(images)
    reference = parity.Reference(spec, images, params).logits
    print(f"shape={'x'.join(map(str, out.shape))} error={parity.relative_error(out, reference):.3g}")
""")


def outcome(done: subprocess.CompletedProcess) -> str:
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return f"the child died with {name}; its stderr ends:\n{done.stderr[-2000:]}"
    return f"exit status {done.returncode}; stderr ends:\n{done.stderr[-2000:]}"


@pytest.mark.parametrize("name", ["mlx", "tinygrad"])
def test_one_forward_pass_in_a_child_process(name):
    if name not in backends.available():
        pytest.skip(f"{name}: {backends.unavailable_reason(name)}")
    done = subprocess.run([sys.executable, "-c", SCRIPT, name], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, outcome(done)
    shape, error = done.stdout.split()[-2:]
    assert shape == "shape=2x10" and float(error.removeprefix("error=")) < 1e-4, done.stdout
