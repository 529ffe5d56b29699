"""Property-based test of the API against its own OpenAPI schema (schemathesis, in-process WSGI).

For every operation in the schema, Hypothesis generates requests (valid and invalid) and sends them
as ada (admin) and as alice (submitter) to a database holding a real case. The property: Loupe never
answers with a server error. Examples are bounded so the whole module stays well under two minutes.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from governance.wsgi import application

# Per operation and actor. CI keeps it small; a deeper hunt:
#   LOUPE_SCHEMA_EXAMPLES=200 make test PYTEST_ARGS=tests/test_schema.py
MAX_EXAMPLES = int(os.environ.get("LOUPE_SCHEMA_EXAMPLES", "10"))

# The schema exactly as /api/schema/ serves it, generated once at import (no database needed).
# The coverage phase (every boundary value of every field, unbounded by max_examples) would take
# minutes on the large bodies; the examples and fuzzing phases stay bounded.
CONFIG = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False}}})
schema = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True), config=CONFIG)
schema.app = application


@pytest.fixture(params=["ada", "alice"])
def token(request, case_with_evidence, ada, alice) -> str:
    """A populated world (Acme's model, version, case with evidence and reviewers) and an API token."""
    return Token.objects.create(user={"ada": ada, "alice": alice}[request.param]).key


@pytest.fixture(autouse=True)
def _keep_the_test_transaction():
    """Django's WSGI handler closes "old" connections around each request, which would close the test's
    transaction; Django's own test client disconnects these handlers the same way."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.mark.django_db
@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@pytest.mark.slow
def test_it_never_answers_with_a_server_error(case, token):
    response = case.call(headers={"Authorization": f"Token {token}"})
    case.validate_response(response, checks=[not_a_server_error])
