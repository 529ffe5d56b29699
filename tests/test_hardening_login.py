"""Attack 4 (issue #20): password guessing is throttled and locked out on the real client address, in
state every process shares, for the API token endpoint and the admin login alike."""

from __future__ import annotations

import pytest
from django.core.cache import cache, caches
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def clean_state(settings):
    settings.AXES_FAILURE_LIMIT = 5
    cache.clear()
    call_command("axes_reset", verbosity=0)
    yield
    cache.clear()


def token(client: APIClient, password: str, *, forwarded_for: str | None = None, username: str = "alice"):
    extra = {"HTTP_X_FORWARDED_FOR": forwarded_for} if forwarded_for else {}
    return client.post("/api/auth/token/", {"username": username, "password": password}, format="json", **extra)


def test_rotating_x_forwarded_for_does_not_buy_more_guesses(alice):
    client = APIClient()
    statuses = [token(client, f"guess-{i}", forwarded_for=f"203.0.113.{i}").status_code for i in range(12)]
    assert 429 in statuses, statuses
    first_refusal = statuses.index(429)
    assert first_refusal <= 6, statuses
    # The right password from the same machine is refused too while the lockout lasts.
    right = token(client, "alice-pw-1234", forwarded_for="198.51.100.7")
    assert right.status_code == 429
    body = right.json()
    assert body["error"] == "locked_out" and "token" not in body


def test_the_admin_login_locks_out_after_repeated_failures(alice, ada):
    client = Client()
    for i in range(20):
        client.post("/admin/login/?next=/admin/", {"username": "ada", "password": f"wrong-{i}"},
                    HTTP_X_FORWARDED_FOR=f"192.0.2.{i}")
    response = client.post("/admin/login/?next=/admin/", {"username": "ada", "password": "ada-pw-1234"})
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session
    assert client.get("/admin/").status_code == 302  # still sent to the login page


def test_an_operator_unlocks_with_the_documented_command(alice):
    client = APIClient()
    for i in range(8):
        token(client, f"guess-{i}")
    assert token(client, "alice-pw-1234").status_code == 429
    call_command("axes_reset", verbosity=0)
    response = token(client, "alice-pw-1234")
    assert response.status_code == 200 and response.json()["token"]


def test_a_trusted_proxy_count_takes_the_client_from_the_header(alice, settings):
    """Behind one trusted proxy, the address that proxy appended is the client: two clients behind
    it are counted separately, and what a client writes in front of it is ignored."""
    settings.LOUPE_TRUSTED_PROXIES = 1
    from governance.client_ip import client_ip

    request = type("R", (), {"META": {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 198.51.100.1"}})()
    assert client_ip(request) == "198.51.100.1"
    settings.LOUPE_TRUSTED_PROXIES = 0
    assert client_ip(request) == "10.0.0.1"


def test_throttle_and_lockout_state_is_shared_by_all_processes():
    """The default cache is the database (embedded) or Redis (LOUPE_CACHE_URL): never per process."""
    backend = type(caches["default"]).__module__
    assert backend in ("django.core.cache.backends.db", "django.core.cache.backends.redis"), backend


@pytest.mark.parametrize("body", ["1.5", "[]", '"alice"'])
def test_a_token_request_whose_body_is_not_an_object_gets_a_json_400(body):
    answer = APIClient().post("/api/auth/token/", body, content_type="application/json")
    assert answer.status_code == 400 and answer.json()["error"] == "invalid", answer.content
