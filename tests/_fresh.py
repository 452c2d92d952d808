"""A script run in a fresh Python process, its last stdout line read as JSON."""

import json
import subprocess
import sys
from pathlib import Path


def json_report(script: str, env: dict[str, str]) -> dict:
    """Run `script` with `env` (the package importable from the checkout) and load its report."""
    env = dict(env, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])
