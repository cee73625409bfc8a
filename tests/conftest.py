"""Test setup: fixtures and hooks only (the helpers the test files share are
in helpers.py: `from helpers import ...`).

8 simulated CPU devices (set before jax is imported), strict rank promotion.
  tfds_dir       one TFDS dir per test process (corpus and tokenizers prepared once)
  fast compile   XLA:CPU's cheap compilation for every program (FAST_XLA_FLAGS)
  compile cache  every training process the tests start shares one JAX
                 persistent compilation cache: a run whose programs an earlier
                 run compiled skips XLA compilation (the children's ENV; the
                 test processes themselves only with SPARSE_LM_TEST_INPROC_CACHE=1)
"""

import os

# XLA:CPU's cheap compilation (no LLVM optimisation, no expensive passes, the
# classic fusion emitters: tests/helpers.py's FAST_COMPILE as flags) for every
# program of the suite, in the test processes and the processes they start
# (helpers.ENV, multihost, notebooks): the tests' programs are tiny, so
# compiling them is most of their cost. Every comparison in the suite is
# between programs built the same way. SPARSE_LM_TEST_FAST_XLA=0 turns it off.
FAST_XLA_FLAGS = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
  "--xla_cpu_use_fusion_emitters=false"
)
_fast = FAST_XLA_FLAGS if os.environ.get("SPARSE_LM_TEST_FAST_XLA", "1") == "1" else ""
os.environ["SPARSE_LM_TEST_XLA_FLAGS"] = _fast  # the children's (helpers.ENV)
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + _fast
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS dir per test process: the corpus and tokenizers are prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
  """One compilation cache for every test process of this session and their
  children (under pytest-xdist, the workers' temporary dirs share a parent)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  cache = base / "jax_compilation_cache"
  cache.mkdir(exist_ok=True)
  helpers.ENV["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  helpers.ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  if os.environ.get("SPARSE_LM_TEST_INPROC_CACHE", "0") == "1":
    # The test processes too (8 devices: their own entries), on request only:
    # it saves CPU (the tests build the same tiny programs many times over;
    # microbatch_test alone: 194 -> 142 s), but writing an entry
    # (executable.serialize() in jax 0.10.2's put_executable_and_time) once
    # segfaulted a pytest-xdist worker in CI (stop 37), and a crashed worker
    # under --dist loadfile hung the run until CI's limit. A child process
    # that crashes fails its own test only, so the children keep the cache.
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return str(cache)
