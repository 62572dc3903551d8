"""medseg: 3D medical image segmentation with mixed precision and activation checkpointing.

The Python API (`medseg.api`): `Segmenter`, `Segmentation`, `train`, `evaluate`, imported on first
use so that `import medseg` stays cheap (no torch, no MONAI) for the command line.

`medseg.train` and `medseg.evaluate` are also the submodules of those names (`import
medseg.train as training` keeps working): the package makes those two modules callable, a call
being `medseg.api.train(...)` / `medseg.api.evaluate(...)`.
"""

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["Segmentation", "Segmenter", "__version__", "evaluate", "train"]


class _CallableModule(types.ModuleType):
    """A submodule that is also the API function of its name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from medseg import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """The `medseg` package: binding its `train` or `evaluate` submodule makes that module callable."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("train", "evaluate") and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name in ("Segmenter", "Segmentation"):
        from medseg import api

        return getattr(api, name)
    if name in ("train", "evaluate"):
        return importlib.import_module(f"medseg.{name}")  # bound (and made callable) by the import
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _Package
