"""Declares the C extension `tvix_store.chunking._cdc` (content-defined chunking) for setuptools.

Everything else about the package is in pyproject.toml; this file exists only because
`ext_modules` cannot be declared there. `pip install -e .` builds the extension in place.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tvix_store.chunking._cdc",
            sources=["tvix_store/chunking/_cdc.c"],
            extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
