"""API routes: ``/api/<resource>/`` (token or session auth). The schema is at ``/api/schema/`` and the
Swagger UI, served from our own static files, at ``/api/docs/``."""

from django.urls import path, re_path
from rest_framework.routers import DefaultRouter

from governance.api import acceptance, exports, notifications, views

router = DefaultRouter()
router.register("organisations", views.OrganisationViewSet, basename="organisation")
router.register("models", views.AIModelViewSet, basename="aimodel")
router.register("versions", views.ModelVersionViewSet, basename="version")
router.register("cases", views.AuditCaseViewSet, basename="case")
router.register("runs", views.ProbeRunViewSet, basename="run")
router.register("evidence", views.EvidenceViewSet, basename="evidence")
router.register("artifacts", views.EvidenceArtifactViewSet, basename="artifact")
router.register("signoffs", views.SignoffViewSet, basename="signoff")
router.register("reports", views.ReportViewSet, basename="report")
router.register("audit-events", views.AuditEventViewSet, basename="auditevent")
router.register("documents", acceptance.ProviderDocumentViewSet, basename="providerdocument")
router.register("webhooks", notifications.WebhookViewSet, basename="webhook")

urlpatterns = [
    path("auth/token/", views.ObtainTokenView.as_view(), name="auth-token"),
    re_path(r"^cases/(?P<pk>[0-9]+)/export/?$", exports.CaseExportView.as_view(), name="case-export"),
    re_path(r"^cases/(?P<pk>[0-9]+)/criteria/?$", acceptance.CaseCriteriaView.as_view(), name="case-criteria"),
    re_path(r"^cases/(?P<pk>[0-9]+)/comments/?$", notifications.CaseCommentsView.as_view(), name="case-comments"),
    re_path(r"^cases/(?P<pk>[0-9]+)/comments/(?P<comment_id>[0-9]{1,18})/resolve/?$",
            notifications.CommentResolveView.as_view(), name="case-comment-resolve"),
    *router.urls,
]
