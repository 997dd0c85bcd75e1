"""Packaging for lisa-rt. The extension lisa_rt._C is built by CMake (see CMakeLists.txt).

Environment:
  LISA_RT_CUDA=0/1        force the CUDA kernels off/on (default: on when torch has CUDA and
                          nvcc is found)
  TORCH_CUDA_ARCH_LIST    e.g. "9.0" or "8.0;9.0" (default: the visible GPU's)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def want_cuda(torch) -> bool:
    flag = os.environ.get("LISA_RT_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = want_cuda(torch)
        env = dict(os.environ)
        if cuda and "TORCH_CUDA_ARCH_LIST" not in env and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DLISA_RT_CUDA={'ON' if cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        print(f"lisa-rt: building _C with CUDA {'on' if cuda else 'off'}", flush=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, env=env, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, env=env, check=True)


setup(ext_modules=[Extension("lisa_rt._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
