"""Content-Security-Policy on every response.

Loupe renders text written by model providers (cards, purposes, evidence summaries); escaping keeps
it from becoming markup, and this policy is the second wall: no inline or third-party script runs,
nothing is framed, no plugin loads. The admin, the review workspace (``static/admin-review``) and
Swagger UI (``SpectacularSwaggerSplitView``, whose start-up script is a file, not inline) all load
their scripts and styles from Loupe's own static files; the browser test checks they still work.
"""

from __future__ import annotations

from django.conf import settings

DEFAULT_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])


#: Swagger UI inserts a ``<style>`` element at run time; its page alone allows inline styles (never
#: inline scripts). The page shows only the schema, no provider text.
SWAGGER_UI_PATH = "/api/docs/"


def _with_inline_styles(policy: str) -> str:
    return policy.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        policy = getattr(settings, "LOUPE_CONTENT_SECURITY_POLICY", DEFAULT_POLICY)
        if policy and "Content-Security-Policy" not in response:
            if request.path == SWAGGER_UI_PATH:
                policy = _with_inline_styles(policy)
            response["Content-Security-Policy"] = policy
        return response
