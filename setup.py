"""Build hook: ship `peft_ext_autoload.pth` at the top of site-packages (wheels and editable installs).

The .pth line imports `_peft_ext_autoload`, which imports peft_ext right after peft, so plain PEFT code
(`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`) loads peft-ext adapters without `import peft_ext`.
Also the package list, found here rather than written by hand in pyproject.toml: every package under
peft_ext/, and the top-level folder kernels/ (with its sub-packages) as peft_ext.kernels (pyproject.toml's
package-dir maps it; it must never be installed as a top-level `kernels`, Hugging Face's package name).
A folder without `__init__.py` is not a package and is left out (tests/test_packaging.py checks there is none).
Everything else about the package is declared in pyproject.toml.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "peft_ext_autoload.pth"
HERE = os.path.dirname(os.path.abspath(__file__))
PTH_SOURCE = os.path.join(HERE, PTH)


def _packages(folder, name):
    """`name` for the folder itself, plus every package below it, renamed under `name`."""
    return [name, *(f"{name}.{sub}" for sub in find_packages(os.path.join(HERE, folder)))]


PACKAGES = [*_packages("peft_ext", "peft_ext"), *_packages("kernels", "peft_ext.kernels")]


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class _StrategyWithPth:
    """Wraps setuptools' editable strategy to add the same .pth to the editable wheel."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        with open(PTH_SOURCE, "rb") as f:
            wheel.writestr(PTH, f.read())


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(packages=PACKAGES, cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
