"""API for comment threads on findings and for webhook endpoints.

- ``GET  /api/cases/{id}/comments/``: the case's comments (optionally ``?finding=<key>``), oldest first;
- ``POST /api/cases/{id}/comments/`` ``{"finding": key, "body": text, "reply_to": id?}``: add one;
- ``POST /api/cases/{id}/comments/{comment}/resolve/``: mark a comment resolved (reviewers, admins);
- ``GET/POST /api/webhooks/``, ``GET/DELETE /api/webhooks/{id}/``: an organisation's endpoints (the
  secret is shown once, in the creation's answer; deleting deactivates, the deliveries stay);
- ``GET /api/webhooks/{id}/deliveries/``: each delivery's status, attempts and last error.

Visibility is the case's (comments) or the organisation's (webhooks), from
:mod:`governance.access`: what a user cannot see is a 404. The rules are
:mod:`governance.comments` and :mod:`governance.notifications`.
"""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.exceptions import NotAuthenticated, PermissionDenied
from rest_framework.exceptions import ValidationError as DRFValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from governance import access, audit_log, comments, notifications
from governance import models as m
from governance.api.permissions import RolePermission
from governance.api.views import ADMIN, AUDITOR, ERRORS, SUBMITTER, LoupeViewSet


class CommentSerializer(serializers.ModelSerializer):
    author = serializers.CharField(source="author.get_username", read_only=True)
    resolved_by = serializers.SerializerMethodField()

    class Meta:
        model = m.FindingComment
        fields = ["id", "case", "finding", "evidence", "author", "body", "reply_to", "created_at", "resolved_by",
                  "resolved_at"]
        read_only_fields = fields

    def get_resolved_by(self, obj: m.FindingComment) -> str | None:
        return obj.resolved_by.get_username() if obj.resolved_by is not None else None


class CommentRequestSerializer(serializers.Serializer):
    finding = serializers.CharField(max_length=300)
    body = serializers.CharField(max_length=comments.MAX_BODY, trim_whitespace=True)
    reply_to = serializers.IntegerField(required=False, allow_null=True, min_value=1)


def _visible_case(request: Request, pk: int) -> m.AuditCase:
    if not access.roles_of(request.user):
        raise PermissionDenied("Your account has no Loupe role.")
    return get_object_or_404(m.AuditCase.objects.visible_to(request.user)
                             .select_related("model_version__ai_model"), pk=pk)


class CaseCommentsView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(operation_id="cases_comments_list", summary="Comment threads on the case's findings",
                   responses={200: CommentSerializer(many=True), **ERRORS})
    def get(self, request: Request, pk: int) -> Response:
        case = _visible_case(request, pk)
        rows = (m.FindingComment.objects.visible_to(request.user).filter(case=case)
                .select_related("author", "resolved_by").order_by("created_at", "pk"))
        finding = request.query_params.get("finding")
        if finding:
            rows = rows.filter(finding=finding)
        return Response(CommentSerializer(rows, many=True).data)

    @extend_schema(operation_id="cases_comments_create", summary="Comment on one finding of the case",
                   request=CommentRequestSerializer, responses={201: CommentSerializer, **ERRORS})
    def post(self, request: Request, pk: int) -> Response:
        case = _visible_case(request, pk)
        serializer = CommentRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        reply_to = None
        if data.get("reply_to"):
            reply_to = m.FindingComment.objects.visible_to(request.user).filter(pk=data["reply_to"], case=case).first()
            if reply_to is None:
                raise DRFValidationError({"reply_to": [f"No comment #{data['reply_to']} in case #{case.pk}."]})
        comment = comments.add_comment(case, request.user, data["finding"], data["body"], reply_to=reply_to)
        return Response(CommentSerializer(comment).data, status=status.HTTP_201_CREATED)


def _signed_in(request: Request) -> User:
    """The request's user, for the rows it creates (the permission classes let no anonymous one here)."""
    if not isinstance(request.user, User):
        raise NotAuthenticated()
    return request.user


class CommentResolveView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(operation_id="cases_comments_resolve", summary="Mark a comment resolved (reviewers, admins)",
                   request=None, responses={200: CommentSerializer, **ERRORS})
    def post(self, request: Request, pk: int, comment_id: int) -> Response:
        case = _visible_case(request, pk)
        comment = get_object_or_404(m.FindingComment.objects.visible_to(request.user), pk=comment_id, case=case)
        return Response(CommentSerializer(comments.resolve(comment, request.user)).data)


# --------------------------------------------------------------------------------------------------
# Webhooks
# --------------------------------------------------------------------------------------------------


class WebhookSerializer(serializers.ModelSerializer):
    events = serializers.ListField(child=serializers.ChoiceField(choices=notifications.EVENTS), required=False,
                                   help_text="Events to send; empty or absent: all.")
    secret = serializers.CharField(write_only=True, required=False, min_length=16, max_length=200,
                                   help_text="HMAC key; generated when absent. Shown only in the creation's answer.")
    organisation = serializers.PrimaryKeyRelatedField(queryset=m.Organisation.objects.all(), required=False)

    class Meta:
        model = m.WebhookEndpoint
        fields = ["id", "organisation", "url", "secret", "events", "is_active", "created_at"]
        read_only_fields = ["id", "is_active", "created_at"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        request = self.context.get("request")
        if request is not None:  # an organisation the user cannot see is "invalid", as for other objects
            organisation: Any = self.fields["organisation"]  # a PrimaryKeyRelatedField, which has a queryset
            organisation.queryset = m.Organisation.objects.visible_to(request.user)

    def validate_url(self, value: str) -> str:
        try:
            notifications.check_url(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from exc
        return value


class WebhookDeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = m.WebhookDelivery
        fields = ["id", "delivery_id", "event", "case", "status", "attempts", "response_status", "last_error",
                  "created_at", "last_attempt_at", "delivered_at", "body"]
        read_only_fields = fields


class WebhookViewSet(LoupeViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                     mixins.DestroyModelMixin):
    """An organisation's webhook endpoints (submitters for their own organisation, admins for any)."""

    queryset = m.WebhookEndpoint.objects.select_related("organisation")
    permission_classes = [RolePermission]  # object rules: access.can_create_for, checked in the actions
    serializer_class = WebhookSerializer
    action_roles = {"create": frozenset({SUBMITTER, ADMIN}), "destroy": frozenset({SUBMITTER, ADMIN}),
                    "list": frozenset({SUBMITTER, AUDITOR, ADMIN}), "retrieve": frozenset({SUBMITTER, AUDITOR, ADMIN}),
                    "deliveries": frozenset({SUBMITTER, AUDITOR, ADMIN})}

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        organisation = data.get("organisation") or access.organisation_of(request.user)
        if organisation is None:
            raise DRFValidationError({"organisation": ["Name the organisation the endpoint is for."]})
        if not access.can_create_for(request.user, organisation):
            raise PermissionDenied("You may register webhooks only for your own organisation.")
        secret = data.get("secret") or secrets.token_urlsafe(32)
        with transaction.atomic():
            endpoint = m.WebhookEndpoint.objects.create(organisation=organisation, url=data["url"], secret=secret,
                                                        events=sorted(set(data.get("events") or [])),
                                                        created_by=_signed_in(request))
            audit_log.record(request.user, "webhook.created", endpoint,
                             {"url": endpoint.url, "events": endpoint.events})
        answer = dict(self.get_serializer(endpoint).data, secret=secret)
        return Response(answer, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: m.WebhookEndpoint) -> None:
        if not access.can_create_for(self.request.user, instance.organisation):
            raise PermissionDenied("You may remove webhooks only of your own organisation.")
        with transaction.atomic():
            m.WebhookEndpoint.objects.filter(pk=instance.pk).update(is_active=False)
            audit_log.record(self.request.user, "webhook.deactivated", instance, {"url": instance.url})

    @extend_schema(summary="Deliveries to this endpoint, newest first",
                   responses={200: WebhookDeliverySerializer(many=True), **ERRORS})
    @action(detail=True, methods=["get"])
    def deliveries(self, request: Request, pk: str | None = None) -> Response:
        endpoint = self.get_object()
        rows = m.WebhookDelivery.objects.visible_to(request.user).filter(endpoint=endpoint).order_by("-pk")[:200]
        return Response(WebhookDeliverySerializer(rows, many=True).data)
