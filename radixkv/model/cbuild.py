"""Compile C sources beside this package into a shared library, once per source and CPU.

The CPU kernels (`decode_attention.c` + `extend_attention.c`, `fused_ops.c`, `kv_store.c`) are
built on first use with the system C compiler (`cc -O3 -march=native -fopenmp`, a few seconds)
into `$RADIXKV_CACHE_DIR/kernels/` (default `~/.cache/radixkv`), keyed by the sources, the
compiler, the flags and the CPU's model and feature flags, and loaded with ctypes: no torch
headers, no build step at install time.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

from radixkv.model.dtype import cache_root, cpu_identity

log = logging.getLogger("radixkv.model")

HERE = Path(__file__).parent
# -ffast-math vectorises expf and the reductions; -fno-finite-math-only keeps -inf (the softmax's
# starting maximum) meaning -inf. Only for compiling: linked with -ffast-math, the library would
# pull in crtfastmath.o, whose constructor turns on flush-to-zero for the whole process.
COMPILE = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-fPIC",
           "-std=c11", "-c")  # fmt: skip
LINK = ("-shared", "-fopenmp")


def build(name: str, files: tuple[str, ...]) -> Path:
    """The library `name` compiled from `files` (C sources and the headers they include, beside
    this module), built now unless already in the cache."""
    texts = {f: (HERE / f).read_text() for f in files}
    cc = os.environ.get("CC", "cc")
    ident = "\0".join((*(f"{f}\0{t}" for f, t in texts.items()), cc, *COMPILE, *LINK,
                       cpu_identity()))  # fmt: skip
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{name}_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = []
        for f, text in texts.items():
            (Path(tmp) / f).write_text(text)
        for f in texts:
            if f.endswith(".c"):
                obj = str(Path(tmp) / f"{f[:-2]}.o")
                run([cc, *COMPILE, str(Path(tmp) / f), "-o", obj])
                objects.append(obj)
        built = Path(tmp) / target.name
        run([cc, *LINK, *objects, "-o", str(built), "-lm"])
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)


def load(name: str, files: tuple[str, ...], switch: str, fallback: str) -> ctypes.CDLL | None:
    """The library `build(name, files)` loaded, or None (logged, naming `fallback`, what runs
    instead) when the environment variable `switch` is "0" or it cannot be built here."""
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        return ctypes.CDLL(str(build(name, files)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # RuntimeError: no home
        detail = getattr(exc, "stderr", "") or exc
        log.warning("%s unavailable (%s); using %s", name, detail, fallback)
        return None
