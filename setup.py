"""Builds the optional C++ CPU kernels ``fastattn._C`` from csrc/ (pybind11, no torch headers).

The build is optional: if the compiler, OpenMP or pybind11 is missing, or the build fails,
the package still installs and the numba backend serves the CPU (``fastattn.backends()``
says which one runs). Set ``FASTATTN_NO_CPP=1`` to skip the build on purpose.
"""
import glob
import os
import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PACKAGES = [
    "fastattn", "fastattn.ops", "fastattn.nn", "fastattn.bench", "fastattn.data",
    "fastattn.models", "fastattn.serving",
    "fastattn.kernels", "fastattn.kernels.triton", "fastattn.kernels.numba",
]
PACKAGE_DIR = {"": "src", "fastattn.kernels": "kernels"}


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the C++ backend is an accelerator, not a need."""

    strict = os.environ.get("FASTATTN_STRICT_BUILD") == "1"  # developers: fail loudly

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure must leave an install
            if self.strict:
                raise
            warnings.warn(f"fastattn: C++ extension not built ({exc}); numba will serve the CPU")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if self.strict:
                raise
            warnings.warn(f"fastattn: C++ extension {ext.name} failed to build ({exc}); "
                          "numba will serve the CPU")


def extensions():
    if os.environ.get("FASTATTN_NO_CPP") == "1":
        return []
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return []
    try:
        import pybind11
        from pybind11.setup_helpers import ParallelCompile
    except ImportError:
        warnings.warn("fastattn: pybind11 not found, C++ extension skipped")
        return []
    # Compile the sources on every core (FASTATTN_BUILD_JOBS=N to cap): one job per file
    # instead of one file at a time halves a 2-core install.
    ParallelCompile("FASTATTN_BUILD_JOBS").install()
    # Portable flags only: the hot loops pick AVX-512 / POPCNT at run time (see csrc/cpu_features.h),
    # so a wheel built here runs on any x86-64 CPU.
    cflags = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden"]
    if sys.platform == "darwin":
        cflags = ["-O3", "-std=c++17", "-Xpreprocessor", "-fopenmp"]
    return [Extension(
        "fastattn._C",
        sources,
        include_dirs=[pybind11.get_include(), "csrc"],
        extra_compile_args=cflags + os.environ.get("FASTATTN_CXXFLAGS", "").split(),
        extra_link_args=["-fopenmp"] if sys.platform != "darwin" else ["-lomp"],
        language="c++",
    )]


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
