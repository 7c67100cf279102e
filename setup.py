"""The one part of the package layout pyproject.toml cannot express: the YAML suites stay in the top-level
``suites/`` directory and ship as the package ``mpbench.suites``, next to every package found under ``mpbench/`` and
``regularizers/`` (everything else is in pyproject.toml)."""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["mpbench", "mpbench.*", "regularizers", "regularizers.*"]), "mpbench.suites"],
    package_dir={"mpbench.suites": "suites"},
)
