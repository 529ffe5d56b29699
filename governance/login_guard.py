"""Login lockout (django-axes): what a locked-out client is told.

Axes counts failed logins per client address (:func:`governance.client_ip.client_ip`) in the
database, which every web process shares, for the admin login and for the API token endpoint
(``ObtainTokenView``). An operator lifts a lockout with ``manage.py axes_reset`` (everything),
``axes_reset_ip ADDRESS`` or ``axes_reset_username NAME``; it also ends after ``AXES_COOLOFF_TIME``.
"""

from __future__ import annotations

from django.http import HttpResponse, JsonResponse

MESSAGE = ("Too many failed logins from this address; try again later, or ask an operator to lift the "
           "lockout (manage.py axes_reset_ip).")


def lockout_response(request, credentials=None, *args, **kwargs) -> HttpResponse:
    if request.path.startswith("/api/"):
        return JsonResponse({"error": "locked_out", "detail": MESSAGE}, status=429)
    return HttpResponse(f"<!doctype html><title>Locked out</title><h1>Locked out</h1><p>{MESSAGE}</p>",
                        status=429)
