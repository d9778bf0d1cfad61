"""tvix_fuse: the read-only FUSE mount of a tvix store (pyfuse3 + trio).

`model` is the filesystem model (no pyfuse3); `ops` the thin pyfuse3 adapter; `mount`
the lifecycle (options, background mode, signals).
"""
