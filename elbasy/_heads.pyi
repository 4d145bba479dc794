"""Type stub for ext/heads.pyx."""

def scan(
    head: bytes, drop_host: bool
) -> tuple[bytes, tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...], bool]: ...
