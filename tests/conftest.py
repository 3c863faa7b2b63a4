"""Test set-up: 8 virtual CPU devices so multi-device code runs on one host."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# Global JAX settings some in-process benchmark mains change (float32 on both sides of a
# side-by-side sets the default matmul precision to "highest"); each test starts from the
# values the session began with, so a test's outcome never depends on which ran before it.
_RESTORED = ("jax_default_matmul_precision",)


@pytest.fixture(autouse=True)
def _restore_jax_globals():
    import jax

    saved = {n: getattr(jax.config, n) for n in _RESTORED}
    yield
    for n, v in saved.items():
        if getattr(jax.config, n) != v:
            jax.config.update(n, v)
