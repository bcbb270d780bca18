"""Start-up hook, run by ``anomalib_aand.pth``: lets ``anomalib benchmark`` run Aand.

anomalib 2.7's ``get_model`` (used by ``anomalib benchmark``) instantiates only classes found in ``anomalib.models``
or in its allowed modules. Importing this module puts one small finder on ``sys.meta_path`` and imports nothing;
only when a program itself imports

- ``anomalib.models``: ``anomalib_aand`` joins ``ALLOWED_MODULES`` and ``anomalib.models.Aand`` becomes a name
  that imports ``anomalib_aand.Aand`` when asked for (``expose_aand``). Nothing is imported before that;
- ``anomalib.pipelines.benchmark.job``, for anomalib versions in ``COLLECT_PATCH_VERSIONS`` only:
  ``BenchmarkJob.collect`` is wrapped so that, when anomalib's own fails, the results are still tabulated
  (``patch_benchmark_collect``). anomalib 2.7.0's raises ``ValueError: All arrays must be of the same length``
  (and writes no results file) as soon as two models in one benchmark differ in their ``init_args`` or metrics,
  as Aand and ReverseDistillation do. Where anomalib's succeeds, its result is returned unchanged. 2.7 is the
  oldest anomalib this package supports and 3.0 the first it does not: narrow the range once upstream fixes it.

Failures only warn: the hook must never break an unrelated program.
"""

import sys
from collections.abc import Callable
from typing import Any

# anomalib versions (major, minor) whose ``BenchmarkJob.collect`` fails on results with different keys: [first, last).
COLLECT_PATCH_VERSIONS = ((2, 7), (3, 0))


def expose_aand(models: Any) -> None:  # noqa: ANN401  (the module anomalib.models)
    """Let ``get_model`` find ``Aand`` and ``anomalib_aand.Aand`` in ``models`` without importing the package yet."""
    models.ALLOWED_MODULES.add("anomalib_aand")
    fallback = models.__dict__.get("__getattr__")

    def lazy_attribute(name: str) -> Any:  # noqa: ANN401
        if name == "Aand":
            from anomalib_aand import Aand  # registers itself as models.Aand

            return Aand
        if fallback is not None:
            return fallback(name)
        msg = f"module {models.__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)

    models.__getattr__ = lazy_attribute


def _release(version: str) -> tuple[int, int]:
    """``"2.7.0"`` -> ``(2, 7)``; pre-release suffixes are ignored."""
    major, minor = [*version.split("."), "0"][:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def patch_benchmark_collect(module: Any, anomalib_version: str | None = None) -> bool:  # noqa: ANN401
    """Wrap ``module.BenchmarkJob.collect`` if the anomalib version (default: the imported one) needs it.

    The wrapper returns anomalib's own result; only when that raises (``ValueError`` for rows of different lengths,
    ``KeyError`` for a key the first row lacks) it builds one row per job, a column a job lacks empty in its row.
    """
    version = anomalib_version or getattr(sys.modules.get("anomalib"), "__version__", "0.0")
    first, last = COLLECT_PATCH_VERSIONS
    if not first <= _release(version) < last:
        return False
    collect = module.BenchmarkJob.collect

    def collect_results(results: list[dict[str, Any]]) -> Any:  # noqa: ANN401  (a pandas DataFrame)
        try:
            return collect(results)
        except (ValueError, KeyError):
            import pandas as pd

            return pd.DataFrame(results)

    module.BenchmarkJob.collect = staticmethod(collect_results)
    return True


ACTIONS: dict[str, Callable[[Any], object]] = {
    "anomalib.models": expose_aand,
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
