"""Builds dcbg's C kernels; everything else about the package is in pyproject.toml

The extension is optional: where no C compiler or Python headers are
present, the install goes on and dcbg runs numba's build of the same
kernels (see dcbg.cpukernels).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("dcbg.cpukernels._compiled",
                             sources=["src/dcbg/cpukernels/compiled.c"],
                             optional=True)])
