"""The test set-up itself (conftest.py): which XLA options the tests' programs compile with."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tiny import elemental_emitters, xla_flags


def test_elemental_emitters_only_for_single_device_programs():
    # the flag must never apply to the whole process: with it, programs on several devices
    # can deadlock in their collectives (conftest.py, docs/reliability.md)
    assert "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "")
    if not elemental_emitters():
        # GFN_JAX_TEST_ELEMENTAL_EMITTERS=0, asked for or set by conftest.py where XLA:CPU
        # rejects the option (jaxlib 0.11): processes the tests start must not get the flag
        assert xla_flags() == ""
        pytest.skip("elemental emitters off or absent in this XLA:CPU")
    from jax._src import compiler

    one = compiler.get_compile_options(num_replicas=1, num_partitions=1)
    eight = compiler.get_compile_options(num_replicas=1, num_partitions=8)
    assert ("xla_cpu_use_fusion_emitters", False) in list(one.env_option_overrides)
    assert not [k for k, _ in eight.env_option_overrides if k == "xla_cpu_use_fusion_emitters"]
    # and both kinds of program compile and agree
    x = np.arange(64.0, dtype=np.float32).reshape(8, 8)
    f = jax.jit(lambda a: jnp.tanh(a) @ a.T)
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(f(sharded)), rtol=1e-6)
    # processes the tests start: the emitters only for a lone single-device process
    assert xla_flags() == "--xla_cpu_use_fusion_emitters=false"
    assert "emitters" not in xla_flags(2) and "emitters" not in xla_flags(1, processes=2)


def test_longest_files_are_collected_first(request):
    import conftest

    here = os.path.dirname(os.path.abspath(__file__))
    missing = [f for f in conftest._LONG_FILES if not os.path.isfile(os.path.join(here, f))]
    assert not missing, f"conftest._LONG_FILES names files that do not exist: {missing}"
    order = []
    for item in request.session.items:
        name = os.path.basename(str(item.path))
        if not order or order[-1] != name:
            order.append(name)
    assert len(order) == len(set(order)), "a file's tests are not contiguous"
    listed = [f for f in order if f in conftest._LONG_FILES]
    assert listed == [f for f in conftest._LONG_FILES if f in listed]
    assert order[:len(listed)] == listed  # the listed files before every other file
