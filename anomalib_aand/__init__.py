"""AAND (Anomaly Amplification and Normality Distillation) as an anomalib 2.x model."""

from .lightning_model import Aand
from .torch_model import AandModel
from .workarounds import allow_non_ascii_paths

__all__ = ["Aand", "AandModel", "register"]


def register() -> None:
    """Make ``Aand`` an ``anomalib.models`` model, for ``get_model`` and ``anomalib benchmark``.

    anomalib 2.7 instantiates only classes found in ``anomalib.models``: afterwards ``class_path: Aand``
    and ``class_path: anomalib_aand.Aand`` both work. Runs on import; the start-up hook installed with
    the package (``anomalib_aand.pth``) imports this package as soon as ``anomalib.models`` is imported.
    """
    import anomalib.models

    anomalib.models.Aand = Aand
    anomalib.models.ALLOWED_MODULES.add(__name__)


register()
allow_non_ascii_paths()
