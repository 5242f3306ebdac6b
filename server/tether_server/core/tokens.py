"""Opaque tokens handed to clients: resume tokens (where a stream stands in the
event log) and page tokens (where a listing stands).

Both are URL-safe base64 without padding of a small versioned text
(``t1|{epoch}|{revision}``, ``p1|{fingerprint}|{after_seq}``), so they pass
through grpcurl, shells and URLs unharmed, and a later format can be told apart
by its version. Opaque is not secret: a token carries no authority, only a
position. Decoding is strict: anything this server did not mint (bad alphabet,
non-canonical base64, wrong version, a number with a sign or spaces) is refused
as malformed with a field violation, never half-understood.
"""

from __future__ import annotations

import base64
import binascii
import re

from .errors import FieldViolation, InvalidRequest, ResumeTokenExpired

RESUME_TOKEN_VERSION = "t1"
PAGE_TOKEN_VERSION = "p1"
MAX_TOKEN_CHARS = 512
"""Longer tokens are refused before any decoding work."""

_SEPARATOR = "|"
_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")
_NUMBER = re.compile(r"0|[1-9][0-9]{0,18}", re.ASCII)


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _pack(*parts: str) -> str:
    if any(_SEPARATOR in part for part in parts):
        raise ValueError(f"token parts must not contain {_SEPARATOR!r}: {parts!r}")
    return _encode(_SEPARATOR.join(parts).encode("utf-8"))


def _unpack(token: str, version: str) -> tuple[str, int] | None:
    """(middle part, number) of a well-formed ``version|middle|number`` token, else None."""
    if len(token) > MAX_TOKEN_CHARS or not _ALPHABET.fullmatch(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    if _encode(raw) != token:
        return None  # non-canonical spelling of the same bytes: not one we minted
    parts = text.split(_SEPARATOR)
    if len(parts) != 3 or parts[0] != version or not _NUMBER.fullmatch(parts[2]):
        return None
    return parts[1], int(parts[2])


def encode_token(epoch: str, revision: int) -> str:
    """The resume token that stands right after event ``revision`` of controller ``epoch``."""
    if revision < 0:
        raise ValueError("revision must not be negative")
    return _pack(RESUME_TOKEN_VERSION, epoch, str(revision))


def decode_token(token: str, *, epoch: str) -> int:
    """The revision a resume token stands at; resuming means "events after it".

    Raises InvalidRequest (INVALID_RESUME_TOKEN) for a token this server could
    not have minted, and ResumeTokenExpired (cause ``foreign_epoch``) for a
    well-formed token of another controller epoch: its revisions mean nothing
    here, and accepting it could silently skip or repeat events. An empty token
    means "no token" and is the caller's to handle before calling this.
    """
    unpacked = _unpack(token, RESUME_TOKEN_VERSION)
    if unpacked is None:
        raise InvalidRequest(
            "INVALID_RESUME_TOKEN",
            "resume_token is not a token this server issued",
            violations=[FieldViolation("resume_token", "not a resume token issued by this server")],
        )
    token_epoch, revision = unpacked
    if token_epoch != epoch:
        raise ResumeTokenExpired(
            "resume_token comes from another controller epoch; list the tasks again "
            "(ListTasks returns a fresh resume_token) and watch from there",
            metadata={"cause": "foreign_epoch"},
        )
    return revision


def encode_page_token(after_seq: int, filter_fingerprint: str) -> str:
    """The page token for "tasks after ``after_seq``, under the filter with this fingerprint"."""
    if after_seq < 0:
        raise ValueError("after_seq must not be negative")
    return _pack(PAGE_TOKEN_VERSION, filter_fingerprint, str(after_seq))


def decode_page_token(token: str, fingerprint: str) -> int:
    """The ``after_seq`` of a page token minted for the filter with ``fingerprint``.

    A token from a listing with another filter is refused: paging on with a
    different filter would skip or repeat tasks without saying so.
    """
    unpacked = _unpack(token, PAGE_TOKEN_VERSION)
    if unpacked is None:
        description = "not a page token issued by this server"
    elif unpacked[0] != fingerprint:
        description = "the filter changed since this page token was issued"
    else:
        return unpacked[1]
    raise InvalidRequest(
        "INVALID_PAGE_TOKEN",
        f"page_token is invalid: {description}",
        violations=[FieldViolation("page_token", description)],
    )
