"""Make `harness` importable from the distributed tests (pytest runs with --import-mode=importlib).

Spawned workers inherit the parent's sys.path, so they find it too.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
