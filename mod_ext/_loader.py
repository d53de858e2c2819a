"""Load the compiled library ``mod_ext._C``, or say exactly why it cannot be loaded.

Importing ``_C`` runs its static registrations (``torch.ops.mod_ext.*``). When it is
missing, Python's own message is misleading: ``from . import _C`` inside a package that
is still initialising reports "cannot import name '_C' from partially initialized module
'mod_ext' (most likely due to a circular import)". The usual cause is not an import cycle
but a source checkout that shadows the installed package: after a non-editable
``pip install .``, running Python from the checkout root puts the checkout's ``mod_ext/``
(which holds no compiled library) first on ``sys.path``. This module names that case.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
from types import ModuleType
from typing import List

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _compiled_libraries(pkg_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(pkg_dir, "_C.*.so")) + glob.glob(os.path.join(pkg_dir, "_C.*.pyd"))
                  + glob.glob(os.path.join(pkg_dir, "_C.so")))


def _other_installed_copies() -> List[str]:
    """Folders named mod_ext with a compiled library elsewhere on sys.path."""
    found = []
    for entry in sys.path:
        pkg = os.path.join(os.path.abspath(entry or os.getcwd()), "mod_ext")
        if os.path.realpath(pkg) != os.path.realpath(_PKG_DIR) and _compiled_libraries(pkg):
            found.append(pkg)
    return list(dict.fromkeys(found))


def load_compiled() -> ModuleType:
    """Import and return ``mod_ext._C``.

    Raises:
        ImportError: the library is missing or fails to load; the message says which,
            where this ``mod_ext`` package lives, whether an installed copy is being
            shadowed by it, and how to build.
    """
    import torch  # the library links against libtorch: load it first

    try:
        return importlib.import_module("mod_ext._C")
    except ImportError as e:
        libs = _compiled_libraries(_PKG_DIR)
        if not libs:
            others = _other_installed_copies()
            if others:
                msg = (
                    f"mod_ext was imported from {_PKG_DIR}, a source tree without the compiled "
                    f"library mod_ext/_C, and it shadows the installed mod_ext at "
                    f"{', '.join(others)}. Run Python from another directory (the current one, "
                    f"{os.getcwd()}, is first on sys.path), or build this tree in place with "
                    "`pip install --no-build-isolation -e .`."
                )
            else:
                msg = (
                    f"mod_ext was imported from {_PKG_DIR}, which holds no compiled library "
                    "(mod_ext/_C). If this is the source checkout and mod_ext is installed "
                    "elsewhere, the checkout shadows it: run Python from another directory. "
                    "Otherwise build it with `pip install --no-build-isolation -e .` from the "
                    "checkout."
                )
        else:
            msg = (
                f"mod_ext's compiled library {libs[0]} could not be loaded: {e}. It must be "
                f"built against the PyTorch you run ({torch.__version__}); rebuild it with "
                "`pip install --no-build-isolation -e .` from the mod_ext checkout."
            )
        raise ImportError(msg) from e
