"""Test configuration: float64 by default, as the maths is checked to the last digit.

Rank promotion raises, so that every broadcast in the package and the tests is explicit.

Tests marked ``subprocess`` (a notebook, an example or a script in a fresh Python process, each
tens of seconds) run first: under pytest-xdist, a worker that picks one up last would otherwise
keep the whole run waiting after the other worker has finished.

The test processes share a persistent compilation cache in a temporary folder, new and empty
for every run and removed at its end: many tests build the same programs (the same solver on
the same shapes, the same small operations), and loading them from the cache rather than
compiling them again took a quarter off the time of the solver tests (and tests/test_losses.py
from 89 s to 68 s). Sharing it between pytest-xdist's two workers took five files of loss and
estimator tests from 118 s to 113 s (3:12 to 2:56 of CPU time). Programs still trace and lower
as before, and JAX records its compilation event for a program loaded from the cache too, so the
tests that count tracings or compilations are unaffected. Processes that the tests start
(notebooks, examples) do not use it.

Each test process drops its compiled programs at the end of every test module
(``jax.clear_caches()``). XLA's CPU backend maps about three memory regions per compiled program
and keeps them while JAX caches the program; a worker that runs several test modules compiles
over twenty thousand programs, and past Linux's default limit of 65,530 mappings per process
(``vm.max_map_count``) the next mapping fails and the worker dies with a segmentation fault
inside XLA (in compilation, or in serialisation for the cache), in whichever test comes next.
Programs that a later module needs again load from the shared cache.

The test processes compile fast: with XLA's backend (LLVM) optimisation off,
``--xla_backend_optimization_level=0``, and with the CPU backend's older elemental code emitter
in place of its fusion emitters, ``--xla_cpu_use_fusion_emitters=false``, unless ``XLA_FLAGS``
already sets that flag (`TEST_XLA_FLAGS`). The suite is bound by compilation: the first flag
halved its time, and the second took compiling a fit from 0.85 s to 0.29 s and the whole run
from 10:59 to 6:56 on two workers. The first flag changes the machine code, not the programs:
the HLO (fusions, casts, the order of operations) is the same. Losses, gradients and Hessian
products come out bit for bit the same as at the default level 3 (integer and one-hot labels,
masks, the vocabulary head, float64 to float16, fused producers included, where optax's float32
loss is NaN at both levels), except where level 3 contracts a multiply and an add into one fused
multiply-add: 83 of 38,400 soft-label float32 gradient components m·s_k − y_k that nearly cancel
differed, each by one ulp of its larger term, both levels within the bound that docs/losses.md
gives for soft labels (at most 4.5 and 5.5 ulps of that term). The second flag changes how the
operations are grouped into kernels (101 fusions in a fit against 137): of 145,224 loss,
gradient and Hessian components (integer and soft labels, float64 to float16, logits of scale 1
to 10⁴), it changed 5 against level 0 alone, each by at most 2.4e-16 of itself. Fits agree to
within their tolerance (on digits at tol = 1e-10, coefficients within 1e-8 of the largest). The
whole suite also passes compiled as users compile. The flags apply to these processes only:
processes that the tests start (notebooks, examples, the fresh float32 processes, the
known-issue check) get the environment as it was, and so run what users run; only the children
that exist to have several CPU devices (the sharded checks) compile fast too. To run the suite
as users compile, set
``XLA_FLAGS="--xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true"``.

It sits at the root so that the package's doctests run under the same settings.
"""

import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


# What the test processes compile with (see the module docstring), unless XLA_FLAGS sets it.
FAST_COMPILATION = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}


def fast_compilation_flags(flags: str | None) -> str:
    """`flags` with those of `FAST_COMPILATION` added that it does not set itself."""
    flags = flags or ""
    added = [f"--{name}={value}" for name, value in FAST_COMPILATION.items() if name not in flags]
    return " ".join([flags, *added]).strip()


_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")
TEST_XLA_FLAGS = fast_compilation_flags(_USER_XLA_FLAGS)


def _start_backend_with(flags: str):
    """Start the backend with `flags`, then give child processes the user's XLA_FLAGS back."""
    os.environ["XLA_FLAGS"] = flags
    try:
        jax.devices()  # XLA reads XLA_FLAGS once, when the backend starts
    finally:
        if _USER_XLA_FLAGS is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = _USER_XLA_FLAGS


_start_backend_with(TEST_XLA_FLAGS)


_SHARED_CACHE = "XENTROPY_JAX_TEST_COMPILATION_CACHE"


def pytest_configure(config):
    """Give the run a fresh persistent compilation cache (see the module docstring).

    The first process to configure (pytest-xdist's controller, or the only process) makes the
    folder and names it in the environment, which the workers it then starts inherit.
    """
    config.owns_compilation_cache = _SHARED_CACHE not in os.environ
    if config.owns_compilation_cache:
        os.environ[_SHARED_CACHE] = tempfile.mkdtemp(prefix="xentropy-jax-test-compilation-cache-")
    config.compilation_cache = os.environ[_SHARED_CACHE]
    config.user_xla_flags = _USER_XLA_FLAGS  # what child processes must see
    config.test_xla_flags = TEST_XLA_FLAGS  # what the sharded checks' children compile with
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    """Remove the cache with the run."""
    if config.owns_compilation_cache:
        shutil.rmtree(config.compilation_cache, ignore_errors=True)
        del os.environ[_SHARED_CACHE]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop the module's compiled programs after its last test (see the module docstring)."""
    yield
    jax.clear_caches()


def pytest_collection_modifyitems(items):
    """Move the long tests that start a fresh Python process to the front (a stable sort)."""
    items.sort(key=lambda item: item.get_closest_marker("subprocess") is None)
