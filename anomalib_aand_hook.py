"""Start-up hook, run by ``anomalib_aand.pth``: registers ``Aand`` in ``anomalib.models`` once that is imported.

anomalib 2.7's ``get_model`` (used by ``anomalib benchmark``) only instantiates classes found in
``anomalib.models``. Importing this module costs one small finder on ``sys.meta_path``; nothing is
imported until a program itself imports ``anomalib.models``, and then ``anomalib_aand`` is imported
and registers itself (see ``anomalib_aand.register``). Failures only warn: the hook must never break
an unrelated program.
"""

import sys

TARGET = "anomalib.models"


class _AnomalibModelsWatcher:
    """Meta-path finder that wraps the loader of ``anomalib.models`` to run the registration afterwards."""

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        """Return ``anomalib.models``'s own spec with a wrapped loader; ``None`` for every other module."""
        del path, target
        if name != TARGET or self._searching:
            return None
        from importlib.util import find_spec  # noqa: PLC0415  (only paid when anomalib.models is imported)

        self._searching = True
        try:
            spec = find_spec(name)
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: object) -> None:
            execute(module)
            self.remove()
            parent, _, child = TARGET.rpartition(".")
            setattr(sys.modules[parent], child, module)  # importlib does this only after we return
            _register()

        spec.loader.exec_module = exec_module
        return spec

    def remove(self) -> None:
        """Take the watcher off ``sys.meta_path`` (its job is done)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def _register() -> None:
    if "anomalib_aand" in sys.modules:  # being imported (it imported anomalib.models): it registers itself
        return
    try:
        import anomalib_aand  # noqa: F401, PLC0415  (registers Aand on import)
    except Exception as error:  # noqa: BLE001  (a broken plugin must not break anomalib)
        import warnings  # noqa: PLC0415

        warnings.warn(
            f"anomalib_aand could not register Aand in anomalib.models ({type(error).__name__}: {error}). "
            "Use `class_path: anomalib_aand.Aand` where anomalib allows it, or reinstall anomalib-aand.",
            stacklevel=2,
        )


def install() -> None:
    """Put the watcher on ``sys.meta_path`` unless ``anomalib.models`` is already imported (then register now)."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(finder, _AnomalibModelsWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsWatcher())
