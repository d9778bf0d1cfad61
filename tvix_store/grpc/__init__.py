"""gRPC adapters of the store: servicers serving any `Store` (`server`), a `Store` backed by a
remote (`client`), and the one domain-exception → status-code map (`status`).

This package is the only place (with `tvix_store.wire`) that touches gRPC or protobuf
types; backends and the FUSE layer never see them.
"""
