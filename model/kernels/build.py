"""Compile the quantized-product kernels into ``_build/`` beside this file: ``python -m homeswarm.model.kernels.build``.

Run by the install (``make``). Four translation units, compiled in parallel by the system's C++ compiler
(``$CXX``, else ``c++``): the torch operators (with OpenMP, so ``at::parallel_for`` uses torch's thread
pool), the scalar kernels, and the AVX2 and AVX-512 ones, each with its own instruction-set flags (the
instruction set is chosen at run time from the CPU's features, so one build serves every x86-64 CPU).
Nothing here may fail the install: with no compiler, no x86-64 or a failed compile, it says so in one
line and exits 0, and the kernels' users keep torch's kernels. The library's name records a hash of
the sources, so a library built from other sources is never loaded.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / "_build"
SOURCES = {  # file -> its own flags
    "ops.cpp": ["-fopenmp"],
    "qmm_scalar.cpp": [],
    "qmm_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "qmm_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c"],
}
HEADERS = ("qmm.h", "qmm_ref.h")
COMMON_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-fvisibility=hidden"]


def source_hash() -> str:
    """A hash of every source and header, and of the torch version the library links against."""
    import torch

    digest = hashlib.sha256(f"{torch.__version__} {COMMON_FLAGS} {SOURCES}".encode())
    for name in sorted([*SOURCES, *HEADERS]):
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    return BUILD_DIR / f"libhomeswarm_kernels-{source_hash()}.so"


def _torch_flags() -> tuple[list[str], list[str]]:
    import torch
    from torch.utils import cpp_extension

    abi = int(torch.compiled_with_cxx11_abi())
    include = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    link = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    return [*include, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"], link


def build(verbose: bool = False) -> Path:
    """Compile and link the library (if not built already); return its path. Raises on failure."""
    target = library_path()
    if target.exists():
        return target
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the kernels are written for x86-64, this machine is {platform.machine()}")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    include, link = _torch_flags()
    common = [*COMMON_FLAGS, *include]
    BUILD_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
        jobs = []
        for name, flags in SOURCES.items():
            obj = Path(tmp) / (name + ".o")
            cmd = [cxx, *common, *flags, "-c", str(HERE / name), "-o", str(obj)]
            jobs.append((name, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        errors = []
        for name, _, proc in jobs:
            output, _ = proc.communicate()
            if proc.returncode:
                errors.append(f"{name}:\n{output}")
            elif verbose and output:
                print(output, file=sys.stderr)
        if errors:
            raise RuntimeError("compiling the kernels failed:\n" + "\n".join(errors))
        staged = Path(tmp) / target.name
        cmd = [cxx, "-shared", "-fopenmp", *[str(obj) for _, obj, _ in jobs], "-o", str(staged), *link]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"linking the kernels failed:\n{done.stdout}{done.stderr}")
        for old in BUILD_DIR.glob("libhomeswarm_kernels-*.so"):  # other sources' builds
            old.unlink()
        os.replace(staged, target)  # atomic: a reader never sees half a library
    return target


def main() -> int:
    start = time.perf_counter()
    try:
        path = build(verbose="-v" in sys.argv)
    except Exception as exc:  # noqa: BLE001 - the install goes on with torch's kernels
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"homeswarm kernels not built ({first}); torch's kernels will be used", file=sys.stderr)
        if "-v" in sys.argv:
            print(exc, file=sys.stderr)
        return 0
    print(f"homeswarm kernels: {path.name} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
