"""Make ``fastdf.kernels`` importable from a source checkout.

Installed, the top-level ``kernels/`` folder is the subpackage ``fastdf/kernels`` (setup.py
maps it with ``package_dir``). Run from a checkout (``PYTHONPATH=.``, a git worktree) the
folder sits beside ``fastdf/`` instead; this loads it under the same name so the two cases
behave alike.
"""

import importlib.util
import sys
from pathlib import Path


def install():
    if "fastdf.kernels" in sys.modules:
        return
    package = Path(__file__).resolve().parent
    if (package / "kernels" / "__init__.py").is_file():
        return  # installed layout: the normal import finds it
    source = package.parent / "kernels"
    if not (source / "__init__.py").is_file():
        return  # editable installs map it through setuptools' finder
    spec = importlib.util.spec_from_file_location(
        "fastdf.kernels", source / "__init__.py", submodule_search_locations=[str(source)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastdf.kernels"] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["fastdf"], "kernels", module)  # what the import system does for submodules
