"""kmgpu.allocator: freed buffers are reused, not faulted in afresh, once the command has set glibc up."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)

# Four 2 MiB buffers at once, every page written, then freed, 20 times (as a fit's temporaries come
# and go, image after image): the minor page faults of those 20 rounds.
PROBE = """
import resource, sys
import numpy as np
from kmgpu.allocator import keep_freed_memory
set_up = keep_freed_memory() if sys.argv[1] == "1" else False
[np.ones(1 << 18) for _ in range(4)]  # the first round, outside the count
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    [np.ones(1 << 18) for _ in range(4)]
print(set_up, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(tuned: bool, env: dict) -> tuple[str, int]:
    """(whether keep_freed_memory set glibc up, page faults of the rounds) in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if tuned else "0"], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_buffers_are_reused_not_faulted_in_again():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert faults(False, env) == ("False", pytest.approx(20 * 2048, rel=0.1))  # every page, every round
    set_up, n = faults(True, env)
    assert set_up == "True" and n < 2048 // 8  # the first round's pages, reused


def test_the_users_own_malloc_settings_stand():
    assert faults(True, {**os.environ, "MALLOC_TRIM_THRESHOLD_": "0"})[0] == "False"
