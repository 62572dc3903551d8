"""MONAI imported without the modules it loads for features medseg does not use.

MONAI imports every one of its submodules at its own import, and with them MLflow (where
installed), scipy.signal and matplotlib's pyplot: together more than a second of every start of a
medseg process. `skip_monai_extras()` keeps those out of MONAI's import in this process.
"""

from __future__ import annotations

import importlib.abc
import sys

# The modules, by the feature of MONAI that imports them.
MONAI_EXTRAS = {
    "mlflow": "its MLflow handler",
    "scipy.signal": "its ultrasound confidence map",
    "matplotlib.pyplot": "its notebook plots",
}


def skip_monai_extras() -> None:
    """From now on in this process, the modules of MONAI_EXTRAS are not found while MONAI is being
    imported (those features of MONAI then say that the module is missing); at any other time each
    imports as usual (MLflow for `train.logger: mlflow`, matplotlib's figures for the previews).
    Without effect once MONAI is imported."""
    if not any(isinstance(finder, _NoExtrasWhileMonaiImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoExtrasWhileMonaiImports())


class _NoExtrasWhileMonaiImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        monai = sys.modules.get("monai")
        if name in MONAI_EXTRAS and getattr(getattr(monai, "__spec__", None), "_initializing", False):
            raise ModuleNotFoundError(f"not imported with MONAI by medseg (for {MONAI_EXTRAS[name]})", name=name)
        return None
