"""Start-up hook, run by ``anomalib_aand.pth``: makes ``anomalib benchmark`` work with Aand.

anomalib 2.7's ``get_model`` (used by ``anomalib benchmark``) only instantiates classes found in
``anomalib.models``. Importing this module puts one small finder on ``sys.meta_path`` and imports
nothing; only when a program itself imports

- ``anomalib.models``: ``anomalib_aand`` is imported and registers ``Aand`` there
  (``anomalib_aand.register``);
- ``anomalib.pipelines.benchmark.job``, for anomalib versions in ``COLLECT_PATCH_VERSIONS`` only:
  ``BenchmarkJob.collect`` is replaced, for every user of that anomalib, by one that accepts results
  with different keys. anomalib 2.7.0's raises ``ValueError: All arrays must be of the same length``
  (and writes no results file) as soon as two models in one benchmark differ in their ``init_args``
  or metrics, as Aand and ReverseDistillation do. The newest upstream source stored here still has
  it; 2.7 is the oldest anomalib this package supports and 3.0 the first it does not, so the range
  is ``>=2.7,<3``: narrow it once upstream fixes ``collect``.

Failures only warn: the hook must never break an unrelated program.
"""

import sys
from collections.abc import Callable
from typing import Any


def _register_aand(module: Any) -> None:  # noqa: ANN401
    del module
    if "anomalib_aand" in sys.modules:  # being imported (it imported anomalib.models): it registers itself
        return
    import anomalib_aand  # noqa: F401  (registers Aand on import)


def _collect_results(results: list[dict[str, Any]]) -> Any:  # noqa: ANN401
    """One row per job; a column a job lacks is empty in its row."""
    import pandas as pd

    return pd.DataFrame(results)


# anomalib versions (major, minor) whose ``BenchmarkJob.collect`` needs the patch: [first, last).
COLLECT_PATCH_VERSIONS = ((2, 7), (3, 0))


def _release(version: str) -> tuple[int, int]:
    """``"2.7.0"`` -> ``(2, 7)``; pre-release suffixes are ignored."""
    major, minor = [*version.split("."), "0"][:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def patch_benchmark_collect(module: Any, anomalib_version: str | None = None) -> bool:  # noqa: ANN401
    """Replace ``module.BenchmarkJob.collect`` if the anomalib version (default: the imported one) needs it."""
    version = anomalib_version or getattr(sys.modules.get("anomalib"), "__version__", "0.0")
    first, last = COLLECT_PATCH_VERSIONS
    if not first <= _release(version) < last:
        return False
    module.BenchmarkJob.collect = staticmethod(_collect_results)
    return True


ACTIONS: dict[str, Callable[[Any], object]] = {
    "anomalib.models": _register_aand,
    "anomalib.pipelines.benchmark.job": patch_benchmark_collect,
}


def _run(name: str, module: Any) -> None:  # noqa: ANN401
    try:
        ACTIONS[name](module)
    except Exception as error:  # noqa: BLE001  (a broken plugin must not break anomalib)
        import warnings

        warnings.warn(
            f"anomalib_aand's start-up hook failed after importing {name} ({type(error).__name__}: {error}). "
            "`anomalib benchmark` may not find Aand; reinstall anomalib-aand.",
            stacklevel=2,
        )


class _AnomalibWatcher:
    """Meta-path finder that wraps the loaders of the modules in ``ACTIONS`` to act once they are executed."""

    def __init__(self) -> None:
        self._searching = False
        self.pending = set(ACTIONS)

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        """The module's own spec with a wrapped loader for the watched modules; ``None`` for every other module."""
        del path, target
        if name not in self.pending or self._searching:
            return None
        from importlib.util import find_spec

        self._searching = True
        try:
            spec = find_spec(name)
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:  # noqa: ANN401
            execute(module)
            self.pending.discard(name)
            if not self.pending and self in sys.meta_path:
                sys.meta_path.remove(self)
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, module)  # importlib does this only after we return
            _run(name, module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Act now for watched modules already imported; watch for the others."""
    if any(isinstance(finder, _AnomalibWatcher) for finder in sys.meta_path):
        return
    watcher = _AnomalibWatcher()
    for name in list(watcher.pending):
        if name in sys.modules:
            watcher.pending.discard(name)
            _run(name, sys.modules[name])
    if watcher.pending:
        sys.meta_path.insert(0, watcher)
