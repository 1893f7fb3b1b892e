"""Layering: :mod:`fastsample.models` knows no Lightning (checkpoints are read by fastsample.lit.loading)."""

from __future__ import annotations

import subprocess
import sys

# A fresh interpreter: another test may already have imported Lightning into this one.
PROBE = """
import sys
import fastsample.models.bundle, fastsample.models.vae, fastsample.models.dsno
loaded = sorted(m for m in ("pytorch_lightning", "lightning", "lightning_fabric") if m in sys.modules)
lit = sorted(m for m in sys.modules if m.startswith("fastsample.lit"))
print(loaded, lit)
sys.exit(1 if loaded or lit else 0)
"""


def test_models_import_no_lightning() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"models import Lightning: {result.stdout}{result.stderr}"
