"""Bearer-token authentication and the owner/admin rule for interrupts.

Tokens come from a file (``--auth-tokens``, or ``TETHER_AUTH_TOKENS_FILE``), one per
line: ``TOKEN PRINCIPAL [admin]``; ``#`` starts a comment. Without a file, auth is
off and every caller is the principal ``anonymous`` with admin rights (the server
listens on 127.0.0.1 by default). With a file, every tether RPC needs
``authorization: Bearer TOKEN``; health and reflection stay open for probes and
grpcurl. A task records its owner; only the owner or an admin may interrupt it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import Unauthenticated


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    admin: bool


ANONYMOUS = Principal("anonymous", admin=True)


class Authenticator:
    """Maps bearer tokens to principals; ``None`` tokens mean auth is off."""

    def __init__(self, tokens: dict[str, Principal] | None = None) -> None:
        self._tokens = tokens

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    @classmethod
    def from_file(cls, path: Path) -> Authenticator:
        tokens: dict[str, Principal] = {}
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
                raise ValueError(f"{path}:{number}: expected 'TOKEN PRINCIPAL [admin]'")
            tokens[parts[0]] = Principal(parts[1], admin=len(parts) == 3)
        if not tokens:
            raise ValueError(f"{path}: no tokens")
        return cls(tokens)

    def authenticate(self, context: Any) -> Principal:
        """The caller of this RPC, or Unauthenticated."""
        if self._tokens is None:
            return ANONYMOUS
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = str(value)
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "this server needs 'authorization: Bearer <token>'",
                metadata={"scheme": "Bearer"},
            )
        for known, principal in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                return principal
        raise Unauthenticated("unknown bearer token", metadata={"scheme": "Bearer"})
