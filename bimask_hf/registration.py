"""bimask-hf's models and image processor, registered with timm and transformers as soon as those load.

``import bimask_hf`` loads neither library. The CIFAR models (``resnet32_cifar`` ...) are registered with
timm, and the 1-channel image processor with transformers' ``AutoImageProcessor``, the moment the library is
imported (or at once, if it already is), so ``timm.create_model("resnet32_cifar")`` and ``pipeline(folder)``
work after ``import bimask_hf`` in any order. Importing ``bimask_hf.models.cifar`` /
``bimask_hf.models.image_processor`` registers them explicitly. With transformers also loads
``bimask_hf.hub.save``, which routes ``save_pretrained`` / ``push_to_hub`` of sparsified models to
:func:`~bimask_hf.hub.save_sparse_model`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__all__ = ["register_when_imported"]

# library -> the modules of bimask-hf that register with it (the Hub layer's save routes go with transformers:
# a sparsified transformers model's save_pretrained / push_to_hub publish its exact N:M folder)
_REGISTRARS = {"timm": ("bimask_hf.models.cifar",),
               "transformers": ("bimask_hf.models.image_processor", "bimask_hf.hub.save")}


def _register(registrars: tuple[str, ...]) -> None:
    for name in registrars:
        importlib.import_module(name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of a library so that the registrar runs after it."""

    def __init__(self) -> None:
        self.pending = dict(_REGISTRARS)
        self.finding: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        registrar = self.pending.get(fullname)
        if registrar is None or fullname in self.finding:
            return None
        self.finding.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the finders after this one
        finally:
            self.finding.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            self.pending.pop(fullname, None)
            if not self.pending and self in sys.meta_path:
                sys.meta_path.remove(self)
            _register(registrar)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def register_when_imported() -> None:
    """Register with each of timm and transformers now if it is loaded, else right after it loads."""
    finder = _RegisterAfterImport()
    # Installed first: a registrar may itself load the other library (transformers' image processors load
    # timm), and that load must register too.
    sys.meta_path.insert(0, finder)
    for library, registrar in _REGISTRARS.items():
        if library in sys.modules and finder.pending.pop(library, None) is not None:
            _register(registrar)
    if not finder.pending and finder in sys.meta_path:
        sys.meta_path.remove(finder)
