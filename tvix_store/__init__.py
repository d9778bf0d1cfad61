"""tvix-store for Python: a content-addressed store for Nix-style file trees.

Layers: domain types (`digest`, `castore`, `pathinfo`), service interfaces with their
backends (`blobservice`, `directoryservice`, `pathinfoservice`), wiring (`store`), the
wire protocol (`proto`, `wire`, `grpc`), Nix formats (`nar`, `nixbase32`, `importer`) and
the command line (`cli`). The FUSE mount is the sibling package `tvix_fuse`.
"""

__version__ = "0.1.0"
