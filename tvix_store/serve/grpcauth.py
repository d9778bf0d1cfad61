"""Bearer-token authorisation of the gRPC daemon: a server interceptor over `security.Tokens`,
and the TLS server credentials.

Every call must carry `authorization: Bearer TOKEN` metadata (what
`grpc.access_token_call_credentials` sends) naming a token of the `--auth-tokens` file:
missing or unknown is UNAUTHENTICATED; a `Put` (BlobService, DirectoryService,
PathInfoService) with a read-only token is PERMISSION_DENIED. Health checks are answered
without a token (load balancers and the clients' own availability probes ask them; they tell
nothing about the store). Refusals are logged at most 10 a minute, without the token.

Not here: parsing the token file and comparing tokens (`security`), the servicers (`grpc`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from tvix_store.remote.status import RateLimitedLog
from tvix_store.serve.security import Scope, TlsFiles, Tokens, bearer_of

log = logging.getLogger("tvix_store.serve.grpc")

_refused = RateLimitedLog("calls refused for lack of a valid token", 10, log)

#: answered without a token
PUBLIC_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call with `code`."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenInterceptor(grpc.ServerInterceptor):
    """See the module docstring; `writes` are the full method names that need an `rw` token."""

    def __init__(self, tokens: Tokens, writes: frozenset[str]) -> None:
        self.tokens = tokens
        self.writes = writes

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method = details.method  # type: ignore[attr-defined]
        if handler is None or method in PUBLIC_METHODS:
            return handler
        header = None
        for key, value in details.invocation_metadata or ():  # type: ignore[attr-defined]
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        scope = self.tokens.scope_of(bearer_of(header))
        if scope is None:
            _refused.warning("%s: refused: %s token", method, "no" if header is None else "an unknown")
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "a valid token is required")
        if method in self.writes and scope is not Scope.WRITE:
            _refused.warning("%s: refused: read-only token", method)
            return _deny(handler, grpc.StatusCode.PERMISSION_DENIED, "this token may only read (scope ro)")
        return handler


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS credentials; with a client CA, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.client_ca is not None,
    )
