"""Freed activation-sized blocks go back to the OS once ``release_freed_memory`` has run."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import os, sys
import torch
if sys.argv[1] == "fixed":
    from lft.train.memory import release_freed_memory
    assert release_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
big = torch.ones(4 * 2**20)  # 16 MB, mmapped; freeing it raises glibc's adaptive threshold
del big
before = rss_mb()
blocks = [torch.ones(2**20) for _ in range(50)]  # 50 x 4 MB: from the heap once the threshold rose
keep = blocks[-1]
del blocks
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_returned_with_a_fixed_mmap_threshold():
    retained = {}
    for mode in ("adaptive", "fixed"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        retained[mode] = float(out.stdout.split()[-1])
    assert retained["fixed"] < 20, retained  # only the block still alive (4 MB) stays
    assert retained["adaptive"] > 100, retained  # glibc's default keeps the freed heap blocks
