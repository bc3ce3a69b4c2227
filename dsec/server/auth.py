"""Token authentication and tenancy for the gRPC API (plus optional TLS / mTLS credentials).

Tokens map to tenants. With no tokens configured the server is open and everything belongs to the
tenant "default" (the embedded, single-user case). With tokens, every RPC must carry
`authorization: Bearer <token>`; a tenant only ever sees its own sandboxes — another tenant's sandbox
is reported as not found, so ids do not leak across tenants.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc
import yaml

from dsec.errors import ERROR_METADATA_KEY

DEFAULT_TENANT = "default"


def load_tokens(path: Path | None, inline: str = "") -> dict[str, str]:
    """Tokens from a YAML file `{token: tenant}` and/or `DSEC_TOKENS="tok1:tenantA,tok2:tenantB"`."""
    tokens: dict[str, str] = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of token → tenant")
        tokens.update({str(k): str(v) for k, v in data.items()})
    for item in filter(None, (part.strip() for part in inline.split(","))):
        token, _, tenant = item.partition(":")
        tokens[token] = tenant or DEFAULT_TENANT
    return tokens


def _bearer(metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


class Authenticator:
    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def tenant_for_token(self, token: str) -> str | None:
        for known, tenant in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return tenant
        return None

    def token_of(self, tenant: str) -> str | None:
        """A token that acts as `tenant` (the first configured), or None: how a front door inside this server
        calls for a tenant whose request carried no key (compat's `owner_of`)."""
        return next((token for token, owner in self.tokens.items() if owner == tenant), None)

    def tenant(self, context: grpc.ServicerContext) -> str:
        """The caller's tenant (the interceptor already rejected unauthenticated calls)."""
        if not self.enabled:
            return DEFAULT_TENANT
        return self.tenant_for_token(_bearer(context.invocation_metadata())) or ""


class AuthInterceptor(grpc.ServerInterceptor):
    """Reject calls without a valid token before any handler runs."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

        def deny(request, context):  # type: ignore[no-untyped-def]
            context.set_trailing_metadata(((ERROR_METADATA_KEY, "Unauthenticated"),))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token: send 'authorization: Bearer <token>'")

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny),
            (True, True): grpc.stream_stream_rpc_method_handler(deny),
        }

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if not self._auth.enabled:
            return continuation(handler_call_details)
        token = _bearer(handler_call_details.invocation_metadata)
        if self._auth.tenant_for_token(token) is not None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._deny[(handler.request_streaming, handler.response_streaming)]


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS, and mutual TLS when a client CA is given (clients must present a certificate it signed)."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
