"""elbasy's local certificate authority: the CA that interception's leaves chain to.

Plain Python over ``cryptography``; no sockets, no event loop. Wherever time
matters the caller passes ``now`` (an aware :class:`datetime`), so tests and
the loop decide what the clock says. Everything the rest of elbasy uses is
importable from here; the modules are split by job:

* :mod:`elbasy.ca.constraints`: names. Intercept globs → the permitted
  subtrees of the CA's NameConstraints (:func:`subtree_for_glob`,
  :func:`constraints_for`, :class:`Constraints`), normalizing a server name,
  and the SAN a leaf for it carries. Pure functions: no files, no keys, no
  clock.
* :mod:`elbasy.ca.storage`: the data dir (:func:`default_data_dir`). Private
  directories, atomic 0600 writes, refusing a CA key others can read, reading
  the CA's certificate, key and ``ca.json`` back with errors that say what to
  run, and the leaf files under ``leaves/``. No signing, and no names beyond
  a file name.
* :mod:`elbasy.ca.authority`: :class:`CertificateAuthority` and
  :class:`Leaf`. Making the CA certificate, minting leaves and renewing them,
  the in-memory LRU, and whether a CA still serves the intercepted hosts
  (:meth:`~CertificateAuthority.needs_new_ca`).
* :mod:`elbasy.ca.errors`: :class:`CAError`, which all three raise.

Why this cut: the authority is the only module that needs the other two; it
decides what goes into a certificate and where it is kept. Names and storage
never import each other. Storage checks that a leaf file is for the expected
SAN, but the authority passes that SAN in as an x509 name, so storage needs
no name rules. The constraints module has no I/O, so its rules can be tested
on their own. :class:`CAError` gets a module of its own because names and
storage both raise it: in either of those two modules it would make the
other import a module it otherwise needs nothing from. Every module logs as
``elbasy.ca``, the name the single module used.
"""

from __future__ import annotations

from elbasy.ca.authority import (
    CA_LIFETIME,
    CA_ROTATE_BEFORE,
    LEAF_LIFETIME,
    CertificateAuthority,
    Leaf,
)
from elbasy.ca.constraints import Constraints, constraints_for, subtree_for_glob
from elbasy.ca.errors import CAError
from elbasy.ca.storage import CA_CERT_FILE, CA_KEY_FILE, default_data_dir

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CA_LIFETIME",
    "CA_ROTATE_BEFORE",
    "LEAF_LIFETIME",
    "CAError",
    "CertificateAuthority",
    "Constraints",
    "Leaf",
    "constraints_for",
    "default_data_dir",
    "subtree_for_glob",
]
