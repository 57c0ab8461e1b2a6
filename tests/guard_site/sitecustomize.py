"""Test-only: tests/launch.py puts this directory on the PYTHONPATH of every process it starts,
with ASCENDSPEED_COLLECTIVE_GUARD=1, so that their torch.distributed collectives are checked
(tests/collective_guard.py) from the moment torch.distributed is imported. Nothing is imported
before that: a process that never uses torch pays nothing."""
import os
import sys

if os.environ.get("ASCENDSPEED_COLLECTIVE_GUARD") == "1" and "collective_guard" not in sys.modules:
    import importlib.util

    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "collective_guard.py")
    _spec = importlib.util.spec_from_file_location("collective_guard", _path)
    _guard = importlib.util.module_from_spec(_spec)
    sys.modules["collective_guard"] = _guard
    _spec.loader.exec_module(_guard)
    _guard.install()
