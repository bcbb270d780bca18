"""Install the start-up hook ``anomalib_aand.pth`` into site-packages, for normal and editable installs.

setuptools has no declarative way to put a ``.pth`` file at the top of site-packages (``data_files``
go under ``sys.prefix``), so the two commands that build the wheel's contents copy it there.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HOOK = Path(__file__).resolve().parent / "anomalib_aand.pth"


class BuildPyWithHook(build_py):
    """Regular wheels: the ``.pth`` goes to the root of ``build_lib``, which becomes site-packages."""

    def run(self) -> None:
        """Build as usual, then copy the hook."""
        super().run()
        self.copy_file(str(HOOK), str(Path(self.build_lib) / HOOK.name))


class EditableWheelWithHook(editable_wheel):
    """Editable wheels (``pip install -e .``) ship only a path hook; add the ``.pth`` beside it."""

    def _run_build_commands(self, dist_name: str, unpacked_wheel: str, build_lib: str, tmp_dir: str):  # noqa: ANN202
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(str(HOOK), str(Path(unpacked_wheel) / HOOK.name))
        return result


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
