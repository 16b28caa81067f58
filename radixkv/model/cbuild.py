"""Compile a C source beside this package into a shared library, once per source and CPU.

The CPU kernels (`decode_attention.c`, `fused_ops.c`) are built on first use with the system C
compiler (`cc -O3 -march=native -fopenmp`, a few seconds) into `$RADIXKV_CACHE_DIR/kernels/`
(default `~/.cache/radixkv`), keyed by the source, the compiler, the flags and the CPU's model and
feature flags, and loaded with ctypes: no torch headers, no build step at install time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from radixkv.model.dtype import cache_root, cpu_identity

# -ffast-math vectorises expf and the reductions; -fno-finite-math-only keeps -inf (the softmax's
# starting maximum) meaning -inf. Only for compiling: linked with -ffast-math, the library would
# pull in crtfastmath.o, whose constructor turns on flush-to-zero for the whole process.
COMPILE = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-fPIC",
           "-std=c11", "-c")  # fmt: skip
LINK = ("-shared", "-fopenmp")


def build(name: str, source: str) -> Path:
    """The library compiled from `source` (built now unless already in the cache)."""
    cc = os.environ.get("CC", "cc")
    ident = "\0".join((source, cc, *COMPILE, *LINK, cpu_identity()))
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{name}_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, obj = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.o"
        src.write_text(source)
        built = Path(tmp) / target.name
        for cmd in ([cc, *COMPILE, str(src), "-o", str(obj)],
                    [cc, *LINK, str(obj), "-o", str(built), "-lm"]):  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target
