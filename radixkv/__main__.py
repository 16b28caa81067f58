"""`python -m radixkv launch ...` (the same as the `radixkv` command)."""

from __future__ import annotations

import sys

from radixkv.tools.cli import main

sys.exit(main())
