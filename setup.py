"""Builds the one C extension (the shm path's streaming copy); everything else is in pyproject.toml.

The extension is optional: where it cannot be built, `tsukimi.transfer.shm_peer` copies with numpy instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tsukimi.transfer._stream_copy", ["libs/tsukimi/transfer/_stream_copy.c"],
                             extra_compile_args=["-O2"], optional=True)])
