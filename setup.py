"""The build of unionfs's FUSE binding, unionfs._pyfuse3 (docs/binding.md).

Everything else about the package is in pyproject.toml. The binding is pyfuse3
3.5.0 with the patches in patches/pyfuse3, compiled here by Cython against the
system's libfuse 3 (found by pkg-config, as upstream's own build does).
"""
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "unionfs/_pyfuse3"
FUSE_MIN = "3.2.0"  # what pyfuse3 3.5.0 needs (FUSE_USE_VERSION 32)
MISSING = ("unionfs: error: building the FUSE binding needs pkg-config and libfuse {} or newer "
           "with its headers (Debian: apt-get install pkg-config libfuse3-dev)").format(FUSE_MIN)


def pkg_config(*args):
    """pkg-config's answer for fuse3, by default only whether it is there and new enough."""
    try:
        out = subprocess.run(["pkg-config", *(args or ("--atleast-version", FUSE_MIN)), "fuse3"],
                             capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit(MISSING) from None
    if out.returncode != 0:
        raise SystemExit(MISSING)
    return out.stdout.split()


class BuildBinding(build_ext):
    """Flags from pkg-config and the Cython step only when an extension is built, so that
    metadata and an sdist need neither libfuse's headers nor a compiler."""

    def finalize_options(self):
        pkg_config()  # fails with MISSING before Cython or the compiler complain less clearly
        from Cython.Build import cythonize

        for ext in self.distribution.ext_modules:
            ext.extra_compile_args += pkg_config("--cflags")
            ext.extra_link_args += pkg_config("--libs")
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules, build_dir="build/cython", quiet=True,
            include_path=[SOURCE + "/Include"])
        super().finalize_options()


setup(
    ext_modules=[Extension(
        "unionfs._pyfuse3.__init__",
        [SOURCE + "/__init__.pyx"],
        include_dirs=[SOURCE + "/Include", SOURCE],
        # upstream's flags (util/build_backend.py), warnings included
        extra_compile_args=["-DFUSE_USE_VERSION=32", "-Wall", "-Wextra", "-Wconversion",
                            "-Wsign-compare", "-Wno-unused-function",
                            "-Wno-implicit-fallthrough", "-Wno-unused-parameter"],
        extra_link_args=["-lpthread", "-lrt"],
    )],
    cmdclass={"build_ext": BuildBinding},
)
