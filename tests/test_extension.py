"""A built lisa_rt._C must load: one that fails to (an undefined symbol, say) would otherwise
only turn every kernel test into a skip and every op into its slow reference."""
from pathlib import Path

import pytest

import lisa_rt
from lisa_rt import ops


def test_a_built_extension_loads():
    package = Path(lisa_rt.__file__).parent
    built = [p for pattern in ("_C*.so", "_C*.pyd") for p in package.glob(pattern)]
    if not built:
        pytest.skip("lisa_rt._C is not built")
    assert ops.HAVE_KERNELS, f"{built[0].name} is built but does not load: {ops.KERNELS_ERROR}"
