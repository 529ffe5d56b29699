"""The client's address, for throttling and login lockout.

``X-Forwarded-For`` is written by whoever sends the request, so it is only believed as far as
``LOUPE_TRUSTED_PROXIES`` reverse proxies in front of Loupe vouch for it: with ``n`` trusted
proxies, the client is the ``n``-th address from the right (the one the outermost trusted proxy
appended). With the default 0, the header is ignored and the socket's peer is the client. The API
throttle and django-axes (the admin login and the token endpoint) both ask this one function.
"""

from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import AnonRateThrottle


def client_ip(request) -> str:
    meta = request.META
    remote = meta.get("REMOTE_ADDR", "") or ""
    trusted = int(getattr(settings, "LOUPE_TRUSTED_PROXIES", 0) or 0)
    forwarded = meta.get("HTTP_X_FORWARDED_FOR")
    if trusted <= 0 or not forwarded:
        return remote
    addresses = [a.strip() for a in forwarded.split(",") if a.strip()]
    if not addresses:
        return remote
    return addresses[-min(trusted, len(addresses))]


class LoginRateThrottle(AnonRateThrottle):
    """Requests per client address on the token endpoint, counted in the shared default cache."""

    scope = "login"

    def get_ident(self, request) -> str:
        return client_ip(request)
