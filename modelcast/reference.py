"""Artifact references: ``name:tag``, ``name@sha256:<hex>`` and ``sha256:<hex>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidReference

# OCI distribution-spec repository name and tag grammar.
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# Whole-string matches only (fullmatch): with re.match, "$" also matches before a trailing newline.
NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_NAME_LEN = 255


def validate_name(name: str) -> str:
    """Return ``name`` if it follows OCI repository rules, else raise InvalidReference."""
    if not name or len(name) > MAX_NAME_LEN or not NAME_RE.fullmatch(name):
        raise InvalidReference(
            f"invalid artifact name {name!r}: use lowercase letters, digits and "
            "separators . _ - within components joined by /"
        )
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise InvalidReference(
            f"invalid tag {tag!r}: up to 128 characters of letters, digits, . _ - "
            "(not starting with . or -)"
        )
    return tag


def validate_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise InvalidReference(f"invalid digest {digest!r}: expected sha256: and 64 lowercase hex digits")
    return digest


@dataclass(frozen=True)
class Reference:
    """A parsed artifact reference.  At least one of ``tag`` or ``digest`` is set."""

    name: str | None
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        if not isinstance(text, str) or not text:
            raise InvalidReference("empty artifact reference")
        if text.startswith("sha256:"):
            return cls(None, None, validate_digest(text))
        if "@" in text:
            name, digest = text.split("@", 1)
            return cls(validate_name(name), None, validate_digest(digest))
        # The tag separator is the last ':' after the last '/', as in OCI references.
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon <= slash:
            raise InvalidReference(
                f"invalid artifact reference {text!r}: expected NAME:TAG, NAME@sha256:HEX or sha256:HEX"
            )
        return cls(validate_name(text[:colon]), validate_tag(text[colon + 1 :]), None)

    def __str__(self) -> str:
        if self.digest and self.name:
            return f"{self.name}@{self.digest}"
        if self.digest:
            return self.digest
        return f"{self.name}:{self.tag}"
