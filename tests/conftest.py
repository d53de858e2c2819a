"""pytest configuration shared by the mod_ext tests.

Shared helpers (devices, tolerances, strided views, exact comparisons) live in
``tests/mod_test_utils.py`` so that test modules can import them by name.
"""

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
