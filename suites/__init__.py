"""The suites shipped with mpbench (``mpbench list suites``): the YAML files in this directory.

This directory is the package ``mpbench.suites`` once built (``package-dir`` in pyproject.toml), so a wheel carries
the suites and ``mpbench.config.suites_dir`` finds them with ``importlib.resources``.
"""
