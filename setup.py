"""The build of unionfs's C extensions: its FUSE binding and its mypyc-compiled modules.

Everything else about the package is in pyproject.toml. The binding, unionfs._pyfuse3
(docs/binding.md), is pyfuse3 3.5.0 with the patches in patches/pyfuse3, compiled here
by Cython against the system's libfuse 3 (found by pkg-config, as upstream's own build
does).

With UNIONFS_MYPYC=1 at build time, the modules a request runs through (COMPILED) are
also compiled by mypyc into one extension, unionfs._compiled__mypyc, with a small
extension per module beside its .py source, which stays installed. It is off by default:
it did not pay in the benchmark and fails test_scale's memory test (docs/benchmarks.md,
"Compiled modules (mypyc)"). A failed mypyc build is a one-line warning and a
pure-Python install. The build writes MANIFEST, the
source hash of each compiled module, which unionfs/__init__.py checks at import so that
a tree whose sources changed after the build runs them, not the stale extensions
(docs/design.md, "Compiled modules").
"""
import contextlib
import hashlib
import os
import subprocess
import sys

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


#: the modules mypyc compiles: those every request runs through (resolution, copy-up,
#: the changes log, the format and the handle table). Not syscalls.py: thin wrappers of
#: os and ctypes calls, and mypyc fails on its ctypes.Structure; not nodes.py: files.py
#: keeps nodes in a WeakSet, and a native class has no weak references.
COMPILED = ["stack", "layers", "merge", "namespace", "union", "copyup", "durable",
            "changes", "format", "files", "owners", "workdir"]
GROUP = "unionfs._compiled"  # the shared extension is GROUP + "__mypyc"
#: written beside the compiled modules: "module sha256-of-source" lines
MANIFEST = "unionfs/_compiled.txt"


def source_hash(module):
    with open(f"unionfs/{module}.py", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def warn(why):
    print(f"unionfs: warning: {why}; installing the pure-Python modules", file=sys.stderr)


def mypyc_extensions():
    """The extensions mypyc makes of COMPILED, or none (not asked for with UNIONFS_MYPYC=1,
    or mypyc missing or failing: the package then runs its Python source)."""
    if os.environ.get("UNIONFS_MYPYC", "") in ("", "0"):
        return ()
    try:
        from mypyc.build import mypycify

        return tuple(mypycify([f"unionfs/{m}.py" for m in COMPILED], opt_level="3",
                              group_name=GROUP, target_dir="build/mypyc"))
    except BaseException as e:  # mypy's errors end in SystemExit
        warn(f"mypyc could not compile the modules ({type(e).__name__}: {e})")
        return ()


class BuildExtensions(build_ext):
    """Flags from pkg-config and the Cython step only when an extension is built, so that
    metadata and an sdist need neither libfuse's headers nor a compiler. The mypyc
    extensions are all or nothing: when one fails, none is installed."""

    def finalize_options(self):
        pkg_config()  # fails with MISSING before Cython or the compiler complain less clearly
        from Cython.Build import cythonize

        binding = [e for e in self.distribution.ext_modules if e.name == BINDING]
        for ext in binding:
            ext.extra_compile_args += pkg_config("--cflags")
            ext.extra_link_args += pkg_config("--libs")
        self.distribution.ext_modules[:] = cythonize(
            binding, build_dir="build/cython", quiet=True,
            include_path=[SOURCE + "/Include"]) + list(MYPYC)
        super().finalize_options()

    def run(self):
        every, compiler = self.extensions, self.compiler  # run() replaces the compiler's name
        self.extensions = [e for e in every if e.name == BINDING]
        super().run()  # the binding: its errors stay errors
        manifest = os.path.join("" if self.inplace else self.build_lib, MANIFEST)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(manifest)  # no manifest, no compiled modules used, until a build succeeds
        self.extensions = [e for e in every if e.name != BINDING]
        if not self.extensions:
            self.remove_outputs(self.stale_mypyc())
            return
        self.compiler = compiler
        try:
            super().run()
        except Exception as e:  # a compiler error, or no compiler for C: setuptools' errors vary
            self.remove_outputs(self.stale_mypyc())
            warn(f"building the mypyc extensions failed ({type(e).__name__}: {e})")
            return
        finally:
            self.extensions = every
        with open(manifest, "w") as f:
            f.writelines(f"{m} {source_hash(m)}\n" for m in COMPILED)

    def stale_mypyc(self):
        """The mypyc extensions an earlier build left where this one would put them."""
        out = self.build_lib if not self.inplace else ""
        names = [GROUP + "__mypyc"] + [f"unionfs.{m}" for m in COMPILED]
        return [os.path.join(out, *n.split(".")) + self.get_ext_filename("x")[1:] for n in names]

    def remove_outputs(self, paths):
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


BINDING = "unionfs._pyfuse3.__init__"
#: mypy runs only when something is built (not for metadata or an sdist)
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}
MYPYC = mypyc_extensions() if BUILDS & set(sys.argv[1:]) else ()

setup(
    ext_modules=[Extension(
        BINDING,
        [SOURCE + "/__init__.pyx"],
        include_dirs=[SOURCE + "/Include", SOURCE],
        # upstream's flags (util/build_backend.py), warnings included
        extra_compile_args=["-DFUSE_USE_VERSION=32", "-Wall", "-Wextra", "-Wconversion",
                            "-Wsign-compare", "-Wno-unused-function",
                            "-Wno-implicit-fallthrough", "-Wno-unused-parameter"],
        extra_link_args=["-lpthread", "-lrt"],
    )] + list(MYPYC),
    cmdclass={"build_ext": BuildExtensions},
)
