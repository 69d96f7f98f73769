"""ss:// URLs (SIP002), pure code.

    ss://userinfo@host:port#tag   userinfo = base64url(method ":" password), padding dropped
"""

from __future__ import annotations

import base64
from urllib.parse import quote

from .address import Address

__all__ = ["format_ss_url"]


def format_ss_url(method: str, password: str, server: Address, tag: str | None = None) -> str:
    userinfo = base64.urlsafe_b64encode(f"{method}:{password}".encode()).decode().rstrip("=")
    host = f"[{server.host}]" if ":" in server.host else server.host
    fragment = f"#{quote(tag)}" if tag else ""
    return f"ss://{userinfo}@{host}:{server.port}{fragment}"
