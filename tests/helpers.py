"""What several test modules share: where the carried Emu data lives, tolerances, comparisons.
Test modules import this, never each other."""
from __future__ import annotations

import os
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# The real Emu language-model configs (and Emu2's checkpoint index), carried in tests/data as
# copied from ../shared/emu; EMU_SHARED_DIR points the tests at another copy.
EMU_DATA = Path(os.environ.get("EMU_SHARED_DIR") or ROOT / "tests" / "data")
