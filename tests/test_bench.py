"""The benchmark scripts still run on the current code (``make bench`` is not part of ``make
test``): ``bench.access`` measures the request path's authentication in process, through the
gateway's own functions and application, and a change to them can break it unseen (a request
made without its application lost the guard of password checks once).

Run small, with a ratio limit no machine can miss: this checks that the script works, not the
machine's speed (that is ``make bench``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_access_bench_runs_on_the_current_code(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "bench.access", "--tenants", "10", "30", "--requests", "50",
            "--iterations", "1000", "--max-ratio", "1000", "--workdir", str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS: in-process ratio" in result.stdout, result.stdout[-3000:]
    assert "Basic, first verification" in result.stdout


def test_every_bench_module_imports() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--only" in result.stdout
