"""Build elbasy's compiled parts: the Cython epoll loop in ext/ becomes
elbasy._loop, and the header-line reader elbasy._heads.

The cffi OpenSSL binding (elbasy._tls) joins here with the interception work:
add its builder to `cffi_modules` below.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("ELBASY_DEBUG") == "1"

extensions = [
    Extension(
        "elbasy._loop",
        sources=["ext/loop.pyx"],
        include_dirs=["ext"],
        depends=["ext/elbasy_io.h", "ext/elbasy_tls.h"],
        # the same libssl as elbasy._tls: the loop reads and writes the SSL*
        # objects that binding creates
        libraries=["ssl", "crypto"],
        define_macros=[("ELBASY_DEBUG", "1" if debug else "0"), ("_GNU_SOURCE", "1")],
        extra_compile_args=["-O2", "-fno-strict-aliasing"] + (["-g", "-O0"] if debug else []),
    ),
    Extension(
        "elbasy._heads",
        sources=["ext/heads.pyx"],
        extra_compile_args=["-O2"] + (["-g", "-O0"] if debug else []),
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
        annotate=os.environ.get("ELBASY_ANNOTATE") == "1",
    ),
)
