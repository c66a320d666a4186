"""Connection URLs fit for messages and logs: passwords masked.

The fleet's URLs (broker, result backend, scan cache) carry Redis passwords, and
every error that names a server is printed to a terminal, a CI log or Flower. So
no message formats a URL itself: it passes the URL, or the text holding it,
through `mask_url` / `mask_urls_in` first.

    mask_url("redis://:s3cret@broker:6379/0")      -> "redis://:***@broker:6379/0"
    mask_url("rediss://worker:s3cret@broker/0")    -> "rediss://worker:***@broker/0"
    mask_url("sentinel://:a@h1:26379;sentinel://:b@h2:26379")
                                -> "sentinel://:***@h1:26379;sentinel://:***@h2:26379"
    mask_url("redis://broker/0?password=s3cret")   -> "redis://broker/0?password=***"

The rules err on the side of hiding too much: a message that loses a host name is
a nuisance, one that shows a password is an incident. One limit: a list of URLs is
split where ";" or "," starts a new `scheme://`, so a password holding such a
sequence unencoded is masked only up to there.
"""

from __future__ import annotations

import re

MASK = "***"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"

# Where the next URL of a list (sentinels: "a;b", or "a,b") starts.
_NEXT_URL = rf"[;,]{_SCHEME}"

# The userinfo of every `scheme://userinfo@` in a text: everything up to the LAST "@"
# before whitespace or the next URL of a list. urllib would stop at "/", "?" or "#",
# but a password holding one of them unencoded would then be printed (redis-py puts
# what follows into its errors), so these are masked with it. The price: a URL with
# an "@" in its path or query loses its host in messages.
_USERINFO = re.compile(rf"(?P<scheme>{_SCHEME})(?P<userinfo>(?:(?!{_NEXT_URL})\S)*)@")

# Query parameters that carry a secret (redis-py takes any `?password=`). The value
# runs to "&", "#" or whitespace, and to ";" or "," only where the next URL of a list
# starts: redis-py keeps them inside a value, so stopping at any ";" would print the
# rest of such a password.
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&](?:password|passwd|pass|pwd|secret|token|auth|access_token|api_key"
    r"|sentinel_password|ssl_password)=)"
    rf"(?P<value>(?:(?!{_NEXT_URL})[^&#\s])*)",
    re.IGNORECASE,
)


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    if not userinfo:
        return match.group(0)  # "redis://@host": nothing to hide
    user, colon, _password = userinfo.partition(":")
    # "user:password" keeps the user, which helps tell accounts apart. A lone value
    # ("redis://s3cret@host") is masked too: it is a username to redis-py, but
    # writing the password there is a common mistake.
    masked = f"{user}:{MASK}" if colon else MASK
    return f"{match.group('scheme')}{masked}@"


def mask_urls_in(text: str) -> str:
    """`text` with the password of every URL in it masked: exception messages, reprs of
    settings, lists of sentinels. Text without URLs comes back unchanged."""
    text = _USERINFO.sub(_mask_userinfo, text)
    return _SECRET_PARAM.sub(lambda m: m.group("key") + MASK, text)


def mask_url(url: str) -> str:
    """One URL (or a `;`/`,`-separated list of them, as sentinel settings are) with its
    passwords masked; the scheme, user, host, port, path and other parameters stay."""
    return mask_urls_in(url)
