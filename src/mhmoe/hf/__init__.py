"""Hugging Face ``transformers`` integration (optional extra ``mhmoe[hf]``).

    import mhmoe                                    # registers lazily (see install_import_hook)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exported/")   # no trust_remote_code
    tok = AutoTokenizer.from_pretrained("exported/")
    out = model.generate(**tok("The sea", return_tensors="pt"), max_new_tokens=20)

Importing this package is cheap (about a millisecond) and never imports ``transformers``; it
calls ``install_import_hook()``, so ``import mhmoe.hf`` (or ``import mhmoe``, which imports it)
is all a program needs before using the Auto classes:

* ``register()`` registers ``MHMoEConfig`` (model_type "mhmoe") with ``AutoConfig`` and
  ``MHMoEModel`` / ``MHMoEForCausalLM`` with ``AutoModel`` / ``AutoModelForCausalLM``
  (idempotent; importing ``mhmoe.hf.modeling`` does it too);
* ``install_import_hook()`` makes that happen by itself: at once when ``transformers`` is
  already imported, otherwise right after the program first imports it (a one-shot import
  hook), so ``import mhmoe`` costs nothing when transformers is never used;
* ``MHMoEConfig``, ``MHMoEModel``, ``MHMoEForCausalLM``, ``MHMoEPreTrainedModel`` are loaded
  (and registered) on first access: ``from mhmoe.hf import MHMoEForCausalLM``.

``mhmoe.decoding`` (KV-cached decoding over a TransformerLM) needs no transformers.

Where mhmoe is not installed, an export folder loads with ``trust_remote_code=True``: it
carries a copy of these modules (``mhmoe.hf.remote_code``), named by config.json's auto_map.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "MHMoEConfig",
    "MHMoEForCausalLM",
    "MHMoEModel",
    "MHMoEPreTrainedModel",
    "install_import_hook",
    "is_available",
    "register",
]

_LAZY = {
    "MHMoEConfig": "mhmoe.hf.configuration",
    "MHMoEModel": "mhmoe.hf.modeling",
    "MHMoEForCausalLM": "mhmoe.hf.modeling",
    "MHMoEPreTrainedModel": "mhmoe.hf.modeling",
    "MHMoECausalLMOutputWithPast": "mhmoe.hf.modeling",
    "MHMoEModelOutputWithPast": "mhmoe.hf.modeling",
}
_registered = False


def is_available() -> bool:
    """Whether ``transformers`` is installed (without importing it)."""
    if "transformers" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # a broken installation counts as absent
        return False


def register() -> None:
    """Register the mhmoe classes with transformers' Auto classes (idempotent).

    Raises ImportError naming the extra when transformers is not installed.
    """
    global _registered
    if _registered:
        return
    if not is_available():
        raise ImportError("mhmoe.hf needs transformers>=5: pip install 'mhmoe[hf]'")
    # An optional extra: importing the modeling module needs transformers, and registers the
    # classes with its Auto classes (mhmoe.hf.modeling.register_auto_classes).
    importlib.import_module("mhmoe.hf.modeling")
    _registered = True


def _register_quietly() -> None:
    configuration = sys.modules.get("mhmoe.hf.configuration")
    if configuration is not None and not hasattr(configuration, "MHMoEConfig"):
        # transformers was first imported by our own configuration module, which is still
        # executing: it registers the config itself when done, the modeling module the models.
        return
    try:
        register()
    except Exception as err:  # never break the user's `import transformers`
        logger.warning("mhmoe: could not register with transformers' Auto classes (%s: %s)",
                       type(err).__name__, err)


class _LoaderThenRegister(importlib.abc.Loader):
    """Wraps transformers' own loader: executes the package, then registers mhmoe."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):  # type: ignore[override]
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[override]
        _remove_hook()
        self._loader.exec_module(module)
        # Put the original loader back so that later introspection sees transformers' own.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        _register_quietly()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _TransformersImportHook(importlib.abc.MetaPathFinder):
    """Finder for the top-level ``transformers`` package: the spec the other finders give, with
    its loader wrapped. It stays installed until the package is actually executed, so that mere
    availability probes (``importlib.util.find_spec("transformers")``) do not use it up."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[override]
        if fullname != "transformers":
            return None
        for finder in list(sys.meta_path):
            if isinstance(finder, _TransformersImportHook) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and not isinstance(spec.loader, _LoaderThenRegister):
            spec.loader = _LoaderThenRegister(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TransformersImportHook)]


def install_import_hook() -> bool:
    """Register with transformers now if it is imported, else as soon as it is; cheap.

    Returns False (and does nothing) when transformers is not installed. Safe to call twice.
    """
    if _registered:
        return True
    if "transformers" in sys.modules:
        _register_quietly()
        return True
    if not is_available():
        return False
    if not any(isinstance(f, _TransformersImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersImportHook())
    return True


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mhmoe.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    register()
    return value


install_import_hook()
