"""Every example script runs as ``python examples/NAME.py`` (small sizes) and prints its result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
TIMEOUT = 180

# The examples that turn on JAX's persistent compilation cache.
USE_COMPILATION_CACHE = {"fit_digits.py", "loss_tour.py"}
# Extra arguments, and a line each script's output must contain.
ARGUMENTS = {"train_mlp_gauss_newton.py": ["--plot", "{tmp}/curves.png"]}
EXPECTED = {
    "fit_digits.py": "xentropy_jax newton-cg",
    "fit_multiprocess.py": "process 1 of 2",
    "loss_tour.py": "matrix-free H·v vs dense",
    "train_mlp_gauss_newton.py": "Gauss-Newton (20 CG its)",
}


def run_example(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Small sizes; no display; one BLAS thread each, since oversubscribed BLAS threads on a
    # busy machine can make scikit-learn's timings (and the test) many times slower.
    env.update(XENTROPY_SMALL="1", MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    # The examples enable JAX's persistent compilation cache: here in a folder of the test's own,
    # with every program written (not only those that took a second to compile).
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    args = [arg.format(tmp=tmp_path) for arg in ARGUMENTS.get(path.name, [])]
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=tmp_path,
        check=False,
    )


def test_child_processes_get_the_users_xla_flags(request):
    """conftest.py compiles the test processes at XLA's optimisation level 0; the examples,
    notebooks and other child processes must run with the flags the user gave, as users do."""
    assert os.environ.get("XLA_FLAGS") == request.config.user_xla_flags
    flags = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('XLA_FLAGS'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert flags == str(request.config.user_xla_flags)


def test_examples_are_known():
    names = {path.name for path in EXAMPLES}
    assert {"fit_digits.py", "train_mlp_gauss_newton.py"} <= names
    assert names <= set(EXPECTED), "add the new example's expected output to EXPECTED"


@pytest.mark.subprocess
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs(path: Path, tmp_path: Path):
    completed = run_example(path, tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert EXPECTED[path.name] in completed.stdout, completed.stdout[-4000:]
    assert "Traceback" not in completed.stderr
    if path.name == "train_mlp_gauss_newton.py":
        assert (tmp_path / "curves.png").stat().st_size > 0
    if path.name == "fit_digits.py":
        check_fit_digits_table(completed.stdout)
    if path.name == "fit_multiprocess.py":
        # Each of the two processes ends with the one-process coefficients.
        lines = [line for line in completed.stdout.splitlines() if line.startswith("process")]
        assert len(lines) == 2, completed.stdout
        for line in lines:
            assert float(line.split("within ")[1].split()[0]) <= 1e-10, line
    if path.name in USE_COMPILATION_CACHE:
        cache = tmp_path / "jax-cache"
        assert cache.is_dir() and any(cache.iterdir()), "no program in the compilation cache"


def check_fit_digits_table(stdout: str) -> None:
    # The headline table: every fit reaches the same objective, accuracy and coefficients.
    rows = [
        line.split() for line in stdout.splitlines() if line.startswith(("xentropy_jax", "sklearn"))
    ]
    assert len(rows) == 6, stdout
    objectives = [float(row[-5]) for row in rows]
    test_accuracies = [float(row[-2]) for row in rows]
    coef_gaps = [float(row[-1]) for row in rows]
    assert max(objectives) - min(objectives) < 1e-9
    assert max(test_accuracies) - min(test_accuracies) < 1e-2
    assert max(coef_gaps) < 1e-4
