"""pytest configuration shared by the mod_ext tests.

``tests`` is a package, so test modules import the shared helpers (devices, tolerances,
strided views, exact comparisons) as ``from tests.helpers import ...``; the oracles they
compare against are in :mod:`mod_ext.reference`. Nothing here changes global state.
"""
