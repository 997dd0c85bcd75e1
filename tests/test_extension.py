"""A built lisa_rt._C must load: one that fails to (an undefined symbol, say) would otherwise
only turn every kernel test into a skip and every op into its slow reference."""
from pathlib import Path

import pytest
import torch

import lisa_rt
from lisa_rt import ops


def test_a_built_extension_loads():
    package = Path(lisa_rt.__file__).parent
    built = [p for pattern in ("_C*.so", "_C*.pyd") for p in package.glob(pattern)]
    if not built:
        pytest.skip("lisa_rt._C is not built")
    assert ops.HAVE_KERNELS, f"{built[0].name} is built but does not load: {ops.KERNELS_ERROR}"


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")
def test_the_cpu_kernels_run_on_every_thread():
    # A _C compiled without OpenMP runs every at::parallel_for on one thread (it did, until
    # 2026-11-28): half the speed on this project's 2-core machine, and no error anywhere.
    assert ops.kernel_threads() == torch.get_num_threads()
