"""Session-wide test set-up."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and other libraries (transformers,
# torch) may import it before the kernel tests do. Without a GPU the kernels can only run in the
# interpreter, so set it for the whole session, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
