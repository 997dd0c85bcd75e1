"""The built lisa_rt._C: it must load (one that fails to, an undefined symbol say, would
otherwise only turn every kernel test into a skip and every op into its slow reference), its
kernels must run on every thread, and on every instruction-set path they can take."""
import os
import subprocess
import sys
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


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")
@pytest.mark.parametrize("capability,allowed", [("avx2", {"avx2", "portable"}), ("default", {"portable"})])
def test_aten_cpu_capability_lowers_the_kernels_isa(capability, allowed):
    """ATEN_CPU_CAPABILITY holds lisa-rt's kernels back as it does torch's: how the tests run
    the AVX2 and portable paths on a CPU that has more."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    isa = subprocess.run([sys.executable, "-c", "from lisa_rt import ops; print(ops.kernel_isa())"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert isa in allowed and ops.kernel_isa() in {"avx512-bf16", "avx2", "portable"}


KERNEL_TESTS = ("tests/test_ops.py", "tests/test_lisa_ops.py", "tests/test_head_align.py", "tests/test_quant.py")
ISA_ORDER = ("portable", "avx2", "avx512-bf16")


@pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")
@pytest.mark.parametrize("capability,isa", [("avx2", "avx2"), ("default", "portable")])
def test_the_kernel_tests_pass_on_the_paths_below_this_cpus(capability, isa):
    """The CPU kernels pick their path at run time, so one machine's run of the kernel tests
    covers only its own: this runs them again held back to AVX2 and to the portable loops (on a
    CPU that has no more than that path already, the run above covered it)."""
    if ISA_ORDER.index(ops.kernel_isa()) <= ISA_ORDER.index(isa):
        pytest.skip(f"this CPU's kernels already take the {ops.kernel_isa()} path")
    root = Path(__file__).parent.parent
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda",
                          *KERNEL_TESTS], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
