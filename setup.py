"""Build of cepe's two extensions.

cepe_c     the C core (csrc/) behind a thin CPython module (cepe_c/), linked
           against a real CPU BLAS and OpenMP. Always built.
cepe_cuda  kernels/*.cu compiled with nvcc, optional: built when nvcc is
           found (CUDA_HOME or PATH); a failure or a missing toolkit only
           prints a warning, so a machine without CUDA still gets the CPU core.
           cuBLAS comes from the toolkit when it has one, else from the
           nvidia-cublas wheel: the build asks for it (setup_requires, which
           PEP 517 front-ends install into the isolated build environment)
           and the installed module finds it at run time through an rpath
           into site-packages, so install that wheel too: the `cuda` extra,
           pip install ".[cuda]".

Environment switches
  CEPE_BLAS=auto       (default) oneMKL from PyPI (the mkl and mkl-include wheels,
                       build requirements on x86-64 Linux) where installed, else
                       scipy-openblas32 from PyPI
  CEPE_BLAS=mkl        oneMKL, or fail; =openblas-pypi: scipy-openblas32
  CEPE_BLAS=system     link a system CBLAS (-lcblas or CEPE_BLAS_LIBS)
  CEPE_NATIVE=0        no -march=native (portable binaries, e.g. wheels)
  CEPE_CUDA=0          never build the CUDA extension; CEPE_CUDA=1: fail if it
                       cannot be built
  CEPE_CUDA_WERROR=1   nvcc and host warnings are errors (CI)
  CEPE_SANITIZE=1      build with AddressSanitizer + UBSan (-O1 -g)
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import glob
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def c_flags() -> list[str]:
    # -ffp-contract=fast: let a*b+c become an FMA (ISO C mode turns that off)
    flags = ["-std=c11", "-fopenmp", "-ffp-contract=fast", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
    if env_flag("CEPE_SANITIZE", "0") in ("1", "true", "yes"):
        flags += [
            "-O1",
            "-g",
            "-fno-omit-frame-pointer",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined",
        ]
    else:
        flags += ["-O3"]
        if env_flag("CEPE_NATIVE", "1") not in ("0", "false", "no"):
            flags += ["-march=native"]
            if platform.machine().lower() in ("x86_64", "amd64"):
                # gcc keeps to 256-bit vectors on AVX-512 CPUs unless told; 512
                # ran the softmax and SwiGLU passes 5-15 % faster here
                # (benchmarks/README.md). A no-op without AVX-512.
                flags += ["-mprefer-vector-width=512"]
    return flags


def find_mkl() -> tuple[str, str, list[str]] | None:
    """(include dir, lib dir, linker args) of the oneMKL wheels (mkl, mkl-include)
    installed in this build environment, or None. Linked against GNU OpenMP
    (libmkl_gnu_thread), the runtime our own OpenMP regions use, so one thread
    pool serves both."""
    import importlib.metadata as md

    try:
        lib = md.distribution("mkl")
        inc = md.distribution("mkl-include")
    except md.PackageNotFoundError:
        return None

    def find(dist: md.Distribution, pattern: str) -> str | None:
        for f in dist.files or []:
            if fnmatch.fnmatch(os.path.basename(str(f)), pattern):
                return os.path.normpath(str(dist.locate_file(f)))
        return None

    header = find(inc, "mkl_cblas.h")
    names = [find(lib, f"libmkl_{part}.so.*") for part in ("intel_lp64", "gnu_thread", "core")]
    if not header or None in names:
        return None
    lib_dir = os.path.dirname(names[0])
    return os.path.dirname(header), lib_dir, [f"-l:{os.path.basename(n)}" for n in names]


def blas_settings() -> dict[str, list[str]]:
    choice = env_flag("CEPE_BLAS", "auto")
    if choice not in ("auto", "mkl", "openblas-pypi", "system"):
        raise SystemExit(f"CEPE_BLAS={choice!r}: expected auto, mkl, openblas-pypi or system")
    if choice in ("auto", "mkl"):
        mkl = find_mkl()
        if mkl is None and choice == "mkl":
            raise SystemExit('CEPE_BLAS=mkl: the oneMKL wheels are not installed (pip install "mkl" "mkl-include")')
        if mkl is not None:
            inc, lib_dir, link = mkl
            return {
                "define_macros": [("CEPE_MKL_BLAS", "1")],
                "include_dirs": [inc],
                "libraries": [],
                "library_dirs": [lib_dir],
                "runtime_library_dirs": [],
                # Installed: the wheel's libraries sit in <prefix>/lib, two levels
                # above site-packages. In-place builds: the absolute directory.
                "extra_link_args": link + ["-Wl,-rpath,$ORIGIN/../..", f"-Wl,-rpath,{lib_dir}"],
            }
    if choice == "system":
        libs = os.environ.get("CEPE_BLAS_LIBS", "cblas").split(",")
        return {
            "define_macros": [("CEPE_SYSTEM_BLAS", "1")],
            "libraries": libs,
            "include_dirs": [],
            "library_dirs": [],
            "runtime_library_dirs": [],
            "extra_link_args": [],
        }
    import scipy_openblas32 as ob  # pinned build requirement

    lib_dir = ob.get_lib_dir()
    return {
        "define_macros": [],
        "include_dirs": [ob.get_include_dir()],
        "libraries": [ob.get_library()],
        "library_dirs": [lib_dir],
        # Installed: the library sits in site-packages/scipy_openblas32/lib,
        # next to us. In-place builds: the absolute directory.
        "runtime_library_dirs": [],
        "extra_link_args": ["-Wl,-rpath,$ORIGIN/scipy_openblas32/lib", f"-Wl,-rpath,{lib_dir}"],
    }


def core_extension() -> Extension:
    blas = blas_settings()
    # Every cepe_c/*.c but the CUDA extension's module, then the C core.
    bindings = [p for p in sorted(glob.glob("cepe_c/*.c")) if os.path.basename(p) != "cuda_module.c"]
    sources = bindings + sorted(glob.glob("csrc/**/*.c", recursive=True))
    link = ["-fopenmp"] + blas["extra_link_args"]
    if env_flag("CEPE_SANITIZE", "0") in ("1", "true", "yes"):
        link += ["-fsanitize=address,undefined"]
    return Extension(
        "cepe_c",
        sources=sources,
        include_dirs=[np.get_include(), "csrc"] + blas["include_dirs"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")] + blas["define_macros"],
        libraries=blas["libraries"] + ["m"],
        library_dirs=blas["library_dirs"],
        extra_compile_args=c_flags(),
        extra_link_args=link,
        # Headers too, so editing one (e.g. ops/elementwise.h) rebuilds its users.
        depends=sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("cepe_c/*.h")),
    )


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cuda_home(nvcc: str) -> str:
    """The toolkit root: CUDA_HOME, nvcc's grandparent, or /usr/local/cuda
    (nvcc on PATH may be a wrapper script elsewhere)."""
    candidates = [
        os.environ.get("CUDA_HOME", ""),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    raise RuntimeError(f"cannot find the CUDA toolkit root for {nvcc} (set CUDA_HOME)")


def cuda_major(cuda_home: str) -> int:
    """The toolkit's major version, from CUDART_VERSION (e.g. 13000 -> 13)."""
    with open(os.path.join(cuda_home, "include", "cuda_runtime_api.h")) as f:
        for line in f:
            if line.startswith("#define CUDART_VERSION"):
                return int(line.split()[2]) // 1000
    raise RuntimeError(f"no CUDART_VERSION in {cuda_home}/include/cuda_runtime_api.h")


def cublas_library(lib_dir: str, major: int) -> str | None:
    """The linker argument for libcublas in lib_dir: the unversioned name when
    it is there, else the soname of this major (the wheels ship no libcublas.so)."""
    if os.path.exists(os.path.join(lib_dir, "libcublas.so")):
        return "-lcublas"
    if os.path.exists(os.path.join(lib_dir, f"libcublas.so.{major}")):
        return f"-l:libcublas.so.{major}"
    return None


def find_cublas(cuda_home: str) -> tuple[str, str, str, str | None]:
    """(include dir, library dir, linker argument, rpath relative to the
    installed module or None) of a cuBLAS matching the toolkit's major: the
    toolkit's own, else the nvidia-cublas wheel's (nvidia/cu<major>/ in newer
    wheels, nvidia/cublas/ in older ones)."""
    major = cuda_major(cuda_home)
    include = os.path.join(cuda_home, "include")
    if os.path.exists(os.path.join(include, "cublas_v2.h")):
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            arg = cublas_library(os.path.join(cuda_home, lib), major)
            if arg:
                return include, os.path.join(cuda_home, lib), arg, None
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        nvidia = None
    for base in list(getattr(nvidia, "__path__", [])):
        for sub in (f"cu{major}", "cublas"):
            root = os.path.join(base, sub)
            include, lib_dir = os.path.join(root, "include"), os.path.join(root, "lib")
            arg = cublas_library(lib_dir, major)
            if arg and os.path.exists(os.path.join(include, "cublas_v2.h")):
                # installed, the module sits in site-packages next to nvidia/
                return include, lib_dir, arg, os.path.relpath(lib_dir, os.path.dirname(base))
    raise RuntimeError(
        f"cuBLAS for CUDA {major} not found in {cuda_home} nor in an nvidia-cublas wheel "
        '(pip install "nvidia-cublas" or ".[cuda]")'
    )


def cuda_extension() -> Extension:
    """cepe_cuda; its kernels/*.cu objects are compiled by BuildExt first."""
    werror = env_flag("CEPE_CUDA_WERROR", "0") in ("1", "true", "yes")
    return Extension(
        "cepe_cuda",
        sources=["cepe_c/cuda_module.c"],
        include_dirs=["csrc"],
        # Static cudart: the module imports on machines without the CUDA
        # runtime and reports "no driver" instead of failing to load.
        libraries=["cudart_static", "rt", "dl", "pthread", "stdc++"],
        extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"] + (["-Werror"] if werror else []),
    )


class BuildExt(build_ext):
    """Compiles kernels/*.cu with nvcc before the extensions are built; if
    that is impossible, drops the optional CUDA extension with a warning."""

    def run(self) -> None:
        mode = env_flag("CEPE_CUDA", "auto")
        cuda = [e for e in self.extensions if e.name == "cepe_cuda"]
        if cuda:
            try:
                self.prepare_cuda(cuda[0])
            except Exception as exc:  # noqa: BLE001 - optional part of the build
                if mode in ("1", "true", "yes", "on"):
                    raise
                print(f"cepe: WARNING: CUDA extension not built: {exc}", file=sys.stderr)
                self.extensions.remove(cuda[0])
        super().run()

    def prepare_cuda(self, ext: Extension) -> None:
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        cu_files = sorted(glob.glob(os.path.join(HERE, "kernels", "*.cu")))
        if not cu_files:
            raise RuntimeError("no kernels/*.cu to compile")
        cuda_home = find_cuda_home(nvcc)
        cublas_include, cublas_lib, cublas_arg, cublas_rel = find_cublas(cuda_home)
        werror = env_flag("CEPE_CUDA_WERROR", "0") in ("1", "true", "yes")
        build_dir = os.path.join(self.build_temp, "kernels")
        os.makedirs(build_dir, exist_ok=True)

        def nvcc_command(cu: str, obj: str) -> list[str]:
            cmd = [
                nvcc,
                "-c",
                cu,
                "-o",
                obj,
                "-O3",
                "-std=c++17",
                "-Icsrc",
                f"-I{cublas_include}",
                "-Xcompiler",
                "-fPIC,-Wall,-Wextra" + (",-Werror" if werror else ""),
                "-gencode",
                "arch=compute_80,code=sm_80",
                "-gencode",
                "arch=compute_90,code=sm_90",
                "-gencode",
                "arch=compute_90,code=compute_90",
            ]
            return cmd + (["-Werror", "all-warnings"] if werror else [])

        objects = [os.path.join(build_dir, os.path.basename(cu) + ".o") for cu in cu_files]
        commands = [nvcc_command(cu, obj) for cu, obj in zip(cu_files, objects, strict=True)]
        for cmd in commands:
            print(" ".join(cmd))
        # nvcc is slow and single-threaded per file: one process per core
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for future in [pool.submit(subprocess.check_call, cmd, cwd=HERE) for cmd in commands]:
                future.result()
        ext.extra_objects = objects
        ext.include_dirs.append(os.path.join(cuda_home, "include"))
        ext.library_dirs += [os.path.join(cuda_home, "lib64"), cublas_lib]
        # dynamic cuBLAS (static cudart): found through the rpath, installed
        # ($ORIGIN-relative) or in place (absolute)
        rpaths = ([f"$ORIGIN/{cublas_rel}"] if cublas_rel else []) + [cublas_lib]
        ext.extra_link_args = [cublas_arg] + [f"-Wl,-rpath,{p}" for p in rpaths]
        print(f"cepe: cuBLAS from {cublas_lib} ({cublas_arg})")


def cuda_build_requires() -> list[str]:
    """The nvidia-cublas wheel, when the CUDA extension will be built against
    a toolkit without cuBLAS of its own (pip's isolated build environment
    sees nothing installed beside it, so the build must ask for it)."""
    if env_flag("CEPE_CUDA", "auto") in ("0", "false", "no", "off"):
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        return []
    try:
        home = find_cuda_home(nvcc)
        major = cuda_major(home)
    except (RuntimeError, OSError, ValueError):
        return []
    if os.path.exists(os.path.join(home, "include", "cublas_v2.h")):
        return []
    return [f"nvidia-cublas>={major},<{major + 1}"] if major >= 13 else [f"nvidia-cublas-cu{major}"]


def extensions() -> list[Extension]:
    exts = [core_extension()]
    if env_flag("CEPE_CUDA", "auto") in ("0", "false", "no", "off"):
        print("cepe: CEPE_CUDA=0, skipping the CUDA extension")
    else:
        exts.append(cuda_extension())
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt}, setup_requires=cuda_build_requires())
