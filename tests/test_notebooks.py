"""Every notebook runs top to bottom at full size, as in Colab, and is stored without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
COLAB_URL = (
    "https://colab.research.google.com/github/xentropy-jax/xentropy_jax/blob/main/notebooks/"
)
# Seconds per cell: a hang fails the test instead of stalling the suite. The slowest cell takes
# about 70 s on a heavily loaded 2-core machine (under 30 s idle).
CELL_TIMEOUT = 300
# The notebooks that turn on JAX's persistent compilation cache themselves.
USE_COMPILATION_CACHE = {"01_maths_checked.ipynb", "02_newton_fitting.ipynb"}


def test_notebooks_exist():
    names = {path.name for path in NOTEBOOKS}
    assert {
        "01_maths_checked.ipynb",
        "02_newton_fitting.ipynb",
        "03_second_order_training.ipynb",
    } <= names


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory) -> Path:
    """A kernel spec that runs this interpreter, whatever `python` resolves to on PATH.

    The `python3` spec that ipykernel installs launches `python` from PATH, which need not be
    the interpreter (and environment) running the tests.
    """
    root = tmp_path_factory.mktemp("kernels")
    spec = root / "xentropy-test"
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "test", "language": "python"})
    )
    return root


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stripped_and_colab_ready(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    assert f"]({COLAB_URL}{path.name})" in first.source
    install = notebook.cells[1]
    assert install.cell_type == "code"
    assert 'if "google.colab" in sys.modules:' in install.source
    assert "%pip install" in install.source
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs not stripped"
    assert notebook.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.subprocess
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path: Path, kernel_spec_dir: Path, monkeypatch, tmp_path: Path):
    # Full size, as a Colab user runs it, in a fresh kernel with JAX's defaults (float32 unless
    # the notebook itself enables 64-bit mode). The kernel inherits this environment: no
    # display, one BLAS thread (oversubscribed BLAS threads on a busy machine make
    # scikit-learn's fits many times slower), and a compilation cache of the test's own.
    for name in ("XENTROPY_SMALL", "JAX_ENABLE_X64"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "jax-cache"
    for name, value in [
        ("MPLBACKEND", "Agg"),
        ("OPENBLAS_NUM_THREADS", "1"),
        ("OMP_NUM_THREADS", "1"),
        ("JAX_COMPILATION_CACHE_DIR", str(cache)),
        ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
    ]:
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(path, as_version=4)
    manager = KernelManager(
        kernel_name="xentropy-test",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]),
    )
    client = nbclient.NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    finally:
        # The client leaves a kernel manager it was given running: without this, every kernel
        # (a process with JAX loaded) outlives its test, and the whole run.
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells[1:])
    errors = [
        output
        for cell in code_cells
        for output in cell.outputs
        if output.get("output_type") == "error"
    ]
    assert errors == []
    # The install cell must stay silent outside Colab.
    assert code_cells[0].outputs == []
    if path.name in USE_COMPILATION_CACHE:
        assert cache.is_dir() and any(cache.iterdir()), "no program in the compilation cache"
