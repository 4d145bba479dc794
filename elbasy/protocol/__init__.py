"""HTTP/1.1 as elbasy needs it: sans-IO, bytes in, plain values out.

`elbasy.protocol.http1` reads heads and framing, `headers` the header
rules shared with the loop, `targets` request targets and authorities;
each is imported by its own name.
"""
