"""Build elbasy's compiled parts: the Cython epoll loop in ext/ becomes
elbasy._loop, the header-line reader elbasy._heads, elbasy._timers (the loop's
timer heap as a Python object, for tests and bench/), and the cffi OpenSSL
binding in ext/tls_build.py becomes elbasy._tls (the SSL_CTX and SSL* objects
of TLS interception, which the loop then drives).

elbasy._loop and elbasy._tls link the same libssl/libcrypto (-lssl -lcrypto;
needs the OpenSSL headers, e.g. Debian's libssl-dev): an SSL* made by one is
used by the other, so they must share one OpenSSL copy. Never mix either with
the stdlib ssl module's objects.
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
        depends=[
            "ext/elbasy_io.h",
            "ext/elbasy_tls.h",
            "ext/elbasy_timers.h",
            "ext/elbasy_timers.pxd",
        ],
        # the same libssl as elbasy._tls: the loop reads and writes the SSL*
        # objects that binding creates
        libraries=["ssl", "crypto"],
        define_macros=[("ELBASY_DEBUG", "1" if debug else "0"), ("_GNU_SOURCE", "1")],
        extra_compile_args=["-O2", "-fno-strict-aliasing"] + (["-g", "-O0"] if debug else []),
    ),
    Extension(
        "elbasy._timers",
        sources=["ext/timers.pyx"],
        include_dirs=["ext"],
        depends=["ext/elbasy_timers.h", "ext/elbasy_timers.pxd"],
        extra_compile_args=["-O2"] + (["-g", "-O0"] if debug else []),
    ),
    Extension(
        "elbasy._heads",
        sources=["ext/heads.pyx"],
        extra_compile_args=["-O2"] + (["-g", "-O0"] if debug else []),
    ),
]

setup(
    cffi_modules=["ext/tls_build.py:ffibuilder"],
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
