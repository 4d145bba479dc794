# The cffi module built from ext/tls_build.py: OpenSSL and elbasy's C part.
# `lib` exposes the functions and constants declared in that file's CDEF.
from typing import Any

ffi: Any
lib: Any
