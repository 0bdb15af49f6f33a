"""The API's bearer token and the browser's session cookie. The token is read from a file
(``args.token_file``, e.g. a mounted Kubernetes Secret) or the ``AIMFAIR_SERVE_TOKEN`` environment
variable of the replica, never from the app's args, so it is in no resolved config, Serve log or
process list. ``POST /login`` trades the token for a session cookie signed with it (HttpOnly,
SameSite=Strict): a browser can then open the audit page and the docs."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Optional

from aimfair_ray import AimfairError

TOKEN_ENV = "AIMFAIR_SERVE_TOKEN"
COOKIE = "aimfair_session"
SESSION_S = 12 * 3600


def check_token_file(path: Optional[str]) -> None:
    """On the driver, before Serve starts: the file exists and holds a token (its text is not kept)."""
    if path is None:
        return
    p = Path(path)
    if not p.is_file() or not p.read_text().strip():
        raise AimfairError(f"token_file {path}: no such file or it is empty; write the token into it (chmod 600)")


PLACEHOLDER = "replace-me"  # the shipped Secret's value: refused, so a forgotten Secret fails closed


def read_token(token_file: Optional[str]) -> Optional[str]:
    """The token: the file's first line, else $AIMFAIR_SERVE_TOKEN, else None (no auth)."""
    token = (Path(token_file).read_text().strip().splitlines()[0].strip() if token_file
             else os.environ.get(TOKEN_ENV, "").strip()) or None
    if token and token.startswith(PLACEHOLDER):
        raise AimfairError("the serve token is the manifest's placeholder: apply cluster/kuberay/rayservice.yaml "
                           "with a random token in its Secret (see its header), or set AIMFAIR_SERVE_TOKEN")
    return token


def _sign(token: str, expires: int) -> str:
    return hmac.new(token.encode(), f"{COOKIE}.{expires}".encode(), hashlib.sha256).hexdigest()


def session_cookie(token: str, now: Optional[float] = None) -> str:
    """A cookie value valid for ``SESSION_S``: its expiry and the token's HMAC of it."""
    expires = int((now or time.time()) + SESSION_S)
    return f"{expires}.{_sign(token, expires)}"


def valid_session(token: str, value: Optional[str], now: Optional[float] = None) -> bool:
    if not value or "." not in value:
        return False
    expires, sig = value.split(".", 1)
    if not expires.isdigit() or int(expires) < (now or time.time()):
        return False
    return hmac.compare_digest(sig.encode(), _sign(token, int(expires)).encode())


def same_token(given: Optional[str], token: str) -> bool:
    return hmac.compare_digest((given or "").encode(), token.encode())
