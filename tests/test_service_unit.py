"""The shipped systemd unit is valid: `systemd-analyze verify` accepts it once its gunicorn exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT_GUNICORN = "/opt/arbstr/venv/bin/gunicorn"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = (ROOT / "arbstr.service").read_text()
    assert f"ExecStart={UNIT_GUNICORN} " in unit  # the path the README's install steps create
    gunicorn = Path(sys.executable).parent / "gunicorn"
    assert gunicorn.exists()
    (tmp_path / "arbstr.service").write_text(unit.replace(UNIT_GUNICORN, str(gunicorn)))
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "arbstr.service")],
                          check=False, capture_output=True, text=True, timeout=60)
    # Warnings about the host (no running systemd in a container) are not about the unit.
    about_unit = [line for line in (done.stdout + done.stderr).splitlines() if "arbstr.service" in line]
    assert done.returncode == 0 and not about_unit, done.stdout + done.stderr
