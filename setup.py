"""Build elbasy's compiled parts: the Cython epoll loop in ext/loop/ becomes
elbasy._loop, the header-line reader elbasy._heads, elbasy._timers (the loop's
timer heap as a Python object, for tests and bench/), elbasy._shm (the
shared-memory quota table of ext/c/elbasy_shm.h, for the workers of
--workers N), elbasy._framing (the loop's head-end and chunked scanners, for
the tests), and the cffi OpenSSL
binding (ext/tls_build.py, its C in ext/c/elbasy_tls_binding.c) becomes
elbasy._tls (the SSL_CTX and SSL* objects of TLS interception, which the loop
then drives).

elbasy._loop and elbasy._tls link the same libssl/libcrypto (-lssl -lcrypto;
needs the OpenSSL headers, e.g. Debian's libssl-dev): an SSL* made by one is
used by the other, so they must share one OpenSSL copy. Never mix either with
the stdlib ssl module's objects.

Layout: ext/c/ holds elbasy's own C (headers the loop inlines, the TLS
binding's source), compiled -Wall -Wextra; ext/includes/ declares that C and
the system calls for Cython once; ext/loop/ is elbasy._loop, one translation
unit of rooms (see ext/loop/loop.pyx).
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("ELBASY_DEBUG") == "1"
optimize = ["-g", "-O0"] if debug else ["-O2"]

# elbasy's own C (ext/c/) and the C that Cython generates from ext/ are both
# held to -Wall -Wextra. Cython 3.3's boilerplate raises none of them here,
# so nothing is silenced; a Cython that does should be answered with the
# one -Wno-... it needs, named here.
WARNINGS = ["-Wall", "-Wextra"]

extensions = [
    Extension(
        "elbasy._loop",
        sources=["ext/loop/loop.pyx"],
        include_dirs=["ext/c"],
        depends=sorted(
            glob.glob("ext/c/*.h") + glob.glob("ext/includes/*") + glob.glob("ext/loop/*.p*")
        ),
        # the same libssl as elbasy._tls: the loop reads and writes the SSL*
        # objects that binding creates
        libraries=["ssl", "crypto"],
        define_macros=[("ELBASY_DEBUG", "1" if debug else "0"), ("_GNU_SOURCE", "1")],
        extra_compile_args=optimize + ["-fno-strict-aliasing"] + WARNINGS,
    ),
    Extension(
        "elbasy._timers",
        sources=["ext/timers.pyx"],
        include_dirs=["ext/c"],
        depends=["ext/c/elbasy_timers.h", "ext/includes/timers.pxd"],
        extra_compile_args=optimize + WARNINGS,
    ),
    Extension(
        "elbasy._shm",
        sources=["ext/shm.pyx"],
        include_dirs=["ext/c"],
        depends=["ext/c/elbasy_shm.h", "ext/includes/shm.pxd"],
        # the same floating-point results as elbasy/quota.py's LocalStore: no
        # fused multiply-add where Python rounds twice
        extra_compile_args=optimize + ["-ffp-contract=off"] + WARNINGS,
        libraries=["pthread"],
    ),
    Extension(
        "elbasy._heads",
        sources=["ext/heads.pyx"],
        extra_compile_args=optimize + WARNINGS,
    ),
    # the loop's head-end and chunked scanners, for the tests that feed them
    # split at every byte (the loop inlines the same header)
    Extension(
        "elbasy._framing",
        sources=["ext/framing.pyx"],
        include_dirs=["ext/c"],
        depends=["ext/c/elbasy_io.h", "ext/includes/io.pxd"],
        define_macros=[("_GNU_SOURCE", "1")],
        extra_compile_args=optimize + WARNINGS,
    ),
]

setup(
    cffi_modules=["ext/tls_build.py:ffibuilder"],
    ext_modules=cythonize(
        extensions,
        include_path=["ext/includes"],
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
