"""AAND (Anomaly Amplification and Normality Distillation) as an anomalib 2.x model.

``Aand`` (the LightningModule) and ``AandModel`` (the torch model) are imported when first asked for, so that the
package's tools that need no anomalib (``python -m anomalib_aand.tools.demo``) start without importing it.
Importing ``Aand`` also registers it in ``anomalib.models`` (``register``), lets dataset paths hold non-ASCII
letters (``workarounds.allow_non_ascii_paths``), and makes the ``anomalib`` command seed runs with
``--seed_everything`` and end with Aand's own message (exit code 2) when it refuses the model's arguments or the
command's input (``workarounds.seed_everything_in_anomalib_cli``, ``model_errors_last_in_anomalib_cli``,
``input_errors_without_traceback_in_anomalib_cli``).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lightning_model import Aand
    from .torch_model import AandModel

__all__ = ["Aand", "AandModel", "register"]


def register() -> None:
    """Make ``Aand`` an ``anomalib.models`` model, for ``get_model`` and ``anomalib benchmark``.

    anomalib 2.7 instantiates only classes found in ``anomalib.models`` or in its allowed modules: afterwards
    ``class_path: Aand`` and ``class_path: anomalib_aand.Aand`` both work.
    """
    import anomalib.models

    from .lightning_model import Aand

    anomalib.models.Aand = Aand
    anomalib.models.ALLOWED_MODULES.add(__name__)


def __getattr__(name: str) -> Any:  # noqa: ANN401  (a class)
    """``Aand`` and ``AandModel``, imported on first use."""
    if name == "Aand":
        from .lightning_model import Aand
        from .workarounds import (
            allow_non_ascii_paths,
            input_errors_without_traceback_in_anomalib_cli,
            model_errors_last_in_anomalib_cli,
            seed_everything_in_anomalib_cli,
        )

        register()
        allow_non_ascii_paths()
        seed_everything_in_anomalib_cli()
        model_errors_last_in_anomalib_cli()
        input_errors_without_traceback_in_anomalib_cli()
        globals()["Aand"] = Aand
        return Aand
    if name == "AandModel":
        from .torch_model import AandModel

        globals()["AandModel"] = AandModel
        return AandModel
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
