"""Packaging: what `pip install` declares, what `import mod_ext` needs, and the message a
user gets when a source checkout shadows the installed package (mod_ext/_loader.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import mod_ext

ROOT = Path(__file__).resolve().parents[1]
PKG = Path(mod_ext.__file__).resolve().parent


# An editable install (this checkout's own) adds a finder that would resolve mod_ext._C
# from the real tree; a non-editable install has none, so the subprocesses drop it.
NO_EDITABLE_FINDER = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
    "if not str(getattr(f, '__module__', '')).startswith('__editable__')]\n"
)


def _run(code: str, cwd: Path, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_hf_without_transformers_names_the_extra(tmp_path):
    """Without transformers, `import mod_ext` works and `import mod_ext.hf` says which extra to install."""
    r = _run(
        """
        import importlib.abc, sys

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "transformers":
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
                return None

        sys.meta_path.insert(0, Blocker())
        import mod_ext
        try:
            import mod_ext.hf
        except ImportError as e:
            print("ERR", e)
        """,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERR mod_ext.hf needs Hugging Face transformers >= 5.0" in r.stdout and "mod_ext[hf]" in r.stdout


def test_pyproject_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # An SPDX string (PEP 639): setuptools deprecates the TOML-table form and stops
    # building it after 2027-02-18.
    assert meta["license"] == "Apache-2.0"
    assert meta["dependencies"] == ["torch>=2.4"], "the core package needs torch only"
    extras = meta["optional-dependencies"]
    assert {"demo", "hf", "test"} <= set(extras)
    assert {"numpy", "tqdm", "matplotlib"} <= {d.split(">")[0].split("=")[0] for d in extras["demo"]}


def test_import_without_the_extras(tmp_path):
    """`import mod_ext` and every library module (all but the demo and its corpus loader,
    which are the [demo] extra, and the Hugging Face integration, the [hf] extra, whose
    transformers needs numpy) import with numpy, tqdm and matplotlib unavailable."""
    r = _run(
        """
        import importlib, importlib.abc, pkgutil, sys

        BLOCKED = {"numpy", "tqdm", "matplotlib"}

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
                return None

        for name in list(sys.modules):
            if name.split(".")[0] in BLOCKED:
                del sys.modules[name]
        sys.meta_path.insert(0, Blocker())
        import mod_ext
        names = [m.name for m in pkgutil.iter_modules(mod_ext.__path__)
                 if m.name not in ("demo", "data", "_C", "hf", "hf_demo")]
        for n in names:
            importlib.import_module("mod_ext." + n)
        leaked = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("imported", sorted(names))
        """,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'layer'" in r.stdout and "'models'" in r.stdout and "'ops'" in r.stdout, r.stdout


def test_shadowing_source_tree_is_named(tmp_path):
    """A checkout without the compiled library, run from its root while an installed copy
    with the library is on sys.path, says that it shadows the installed copy (Python's own
    message would blame a circular import)."""
    checkout = tmp_path / "checkout"
    shutil.copytree(PKG, checkout / "mod_ext", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    installed = tmp_path / "site" / "mod_ext"
    installed.mkdir(parents=True)
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")  # only its name is looked at
    r = _run(NO_EDITABLE_FINDER + "import mod_ext", cwd=checkout, env_extra={"PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode != 0
    err = r.stderr
    assert "circular import" not in err.splitlines()[-1], err[-2000:]
    assert "shadows the installed mod_ext" in err and str(installed) in err, err[-2000:]
    assert str(checkout / "mod_ext") in err, err[-2000:]


def test_missing_library_without_an_installed_copy(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(PKG, checkout / "mod_ext", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    r = _run(NO_EDITABLE_FINDER + "import mod_ext", cwd=checkout)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: mod_ext was imported from"), r.stderr[-2000:]
    assert "pip install --no-build-isolation -e ." in last


def test_demo_without_its_extra_names_the_extra(tmp_path):
    """`python -m mod_ext.demo` without the [demo] extra says which extra to install."""
    r = _run(
        """
        import importlib.abc, runpy, sys

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "matplotlib":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.modules.pop("matplotlib", None)
        sys.meta_path.insert(0, Blocker())
        runpy.run_module("mod_ext.demo", run_name="__main__")
        """,
        cwd=tmp_path,
    )
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "needs the [demo] extra" in last and "matplotlib" in last, r.stderr[-2000:]
