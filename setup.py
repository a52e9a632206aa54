"""Only what pyproject.toml cannot say: the cffi extension `cwbuild.disk._xts_c`, compiled at install time
from cwbuild/disk/_xts_build.py. Everything else about the package is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["cwbuild/disk/_xts_build.py:ffibuilder"])
