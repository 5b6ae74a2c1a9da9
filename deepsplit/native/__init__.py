"""Native CPU kernels of the serving path (`*.cpp` here), compiled once per machine and cached.

`load()` builds every `*.cpp` of this directory into one shared library with g++ (`-O3
-march=native`, OpenMP through torch's own runtime), caches it under `$DEEPSPLIT_NATIVE_CACHE` (default
`~/.cache/deepsplit/native`) keyed by the sources, torch version, compiler and CPU flags, and
registers its ops as `torch.ops.deepsplit.*`. Without a compiler, on a build error or with
`DEEPSPLIT_NATIVE=0` it returns False once (logged) and callers keep their pure-torch path. It does
not decide where the kernels are used; the model does.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SRC = Path(__file__).parent
_loaded: bool | None = None


def load() -> bool:
    """Build (first time on this machine) and load the kernels; True when `torch.ops.deepsplit` has them."""
    global _loaded
    if _loaded is None:
        _loaded = False
        if os.environ.get("DEEPSPLIT_NATIVE", "1") == "0":
            log.info("native kernels disabled (DEEPSPLIT_NATIVE=0)")
        else:
            try:
                torch.ops.load_library(str(_build()))
                _loaded = True
            except Exception as e:  # noqa: BLE001 - any failure means: keep the torch path
                log.warning("native kernels unavailable, using the torch path: %s", e)
    return _loaded


def _build() -> Path:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx})")
    sources = sorted(_SRC.glob("*.cpp"))
    headers = sorted(_SRC.glob("*.h"))
    from torch.utils import cpp_extension

    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++20", "-ffp-contract=fast"]
    flags += ["-shared", "-fPIC"]
    flags += ["-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    ldflags = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu"]
    key = hashlib.sha256()
    for part in [torch.__version__, _compiler_version(cxx), _cpu_flags(), *flags, *ldflags]:
        key.update(part.encode())
    for src in sources + headers:
        key.update(src.read_bytes())
    cache = Path(os.environ.get("DEEPSPLIT_NATIVE_CACHE", Path.home() / ".cache" / "deepsplit" / "native"))
    out = cache / key.hexdigest()[:16] / "deepsplit_native.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library
        if not out.exists():
            log.info("building native kernels into %s", out)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_out = Path(tmp) / out.name
                cmd = [cxx, *flags, *map(str, sources), "-o", str(tmp_out), *ldflags]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"g++ failed:\n{res.stderr[-4000:]}")
                os.replace(tmp_out, out)
    return out


def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native runs only where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()
