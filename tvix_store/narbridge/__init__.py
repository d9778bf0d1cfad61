"""nar-bridge: the store as a Nix HTTP binary cache, both ways (`NAR-BRIDGE.md`).

`nix copy --from`/substituters read narinfos rendered from PathInfos and NARs rendered on the
fly from the castore node encoded in the NAR URL; `nix copy --to` uploads NARs (xz, zstd,
bzip2 or none), ingested while they stream, then narinfos, which become PathInfos through
`tvix_store.admission`. Modules:

    narinfo   the text formats: narinfo, fingerprint, nix-cache-info, URL names
    signing   Nix signing keys (ed25519, `cryptography`)
    index     what must be remembered between an upload and its narinfo, kept in the store
    ingest    an uploaded body into the store while it streams
    listing   `.ls` listings
    app       the aiohttp application: handlers, error → status map, limits
    server    the listening socket, readiness, graceful stop (in a thread for the daemon)

The HTTP stack is aiohttp (server side only): its C parser, streamed request bodies with flow
control, graceful shutdown; the store stays blocking and runs on thread pools.
"""
