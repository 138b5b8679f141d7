"""collector/gcpolicy.py: a serving collector process freezes its start-up heap and spaces the
cyclic collector's passes out; cycles are still collected. In a child process, so the test
process keeps CPython's defaults."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import gc, json
from collector import gcpolicy
before = gc.get_threshold()
gcpolicy.tune()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after tune(): still collected by a pass
del a, b
print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count() > 0, gc.collect() >= 2]))
"""


def test_tune_freezes_the_start_up_heap_and_spaces_the_passes():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    before, after, frozen, collected = json.loads(out.stdout)
    assert before == [700, 10, 10] and after == [50_000, 20, 10]
    assert frozen and collected
