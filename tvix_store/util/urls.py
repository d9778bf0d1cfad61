"""`redact(url)`: a store URL as it may be printed or logged, without its secrets.

A password in the authority (`postgresql://user:PW@host/db`) and the values of query options
whose names say they are secret (`aws_secret_access_key`, `aws_session_token`, `password`,
anything with `secret`, `token`, `password` or `key` in its name except `…key_id`) become
`***`. Everything else is kept, so the URL still says which store it is. Pure: no I/O, no
knowledge of the schemes.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

_SECRET = re.compile(r"secret|token|password|passwd|(?<!_)key$|_key$|credential", re.IGNORECASE)


def _is_secret(name: str) -> bool:
    return bool(_SECRET.search(name)) and not name.lower().endswith("key_id")


def redact(url: str) -> str:
    try:
        u = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc, query = u.netloc, u.query
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(k) for k, _ in pairs):
            query = urlencode([(k, "***" if _is_secret(k) else v) for k, v in pairs], safe="/:*")
    if (netloc, query) == (u.netloc, u.query):
        return url  # nothing secret: exactly as given (`local:///x` keeps its empty authority)
    out = f"{u.scheme}://{netloc}{u.path}"
    return out + (f"?{query}" if query else "") + (f"#{u.fragment}" if u.fragment else "")
