"""The generated sync twin of the engine is current (CI fails otherwise).

``stampede/_sync/engine.py`` is generated from ``stampede/_async/engine.py``
by ``scripts/make_sync.py``; a hand edit of the generated file, or a change
to the async source without regenerating, fails here and in ``.ci/run``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_generated_sync_engine_is_current() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_sync.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
