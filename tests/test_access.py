"""Who sees what: roles, central queryset narrowing, and the admin built on it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group

from governance import access, audit_log, workflow
from governance import models as m

NARROWED = [m.Organisation, m.AIModel, m.ModelVersion, m.AuditCase, m.ProbeRun, m.Evidence, m.EvidenceArtifact,
            m.Signoff, m.AuditEvent]


@pytest.fixture
def world(case_with_evidence, globex_case, rita, mallory):
    """Acme's case (reviewed by rita and rob, one approval by rita) next to Globex's draft."""
    workflow.sign_off(case_with_evidence, rita, "approve")
    audit_log.record(mallory, "case.created", globex_case, {"title": globex_case.title})
    return case_with_evidence, globex_case


def visible_cases(user) -> set[str]:
    return set(m.AuditCase.objects.visible_to(user).values_list("title", flat=True))


def test_it_shows_a_submitter_only_their_organisations_work(world, alice, mallory, acme, globex):
    acme_case, globex_case = world
    assert visible_cases(alice) == {acme_case.title}
    assert visible_cases(mallory) == {globex_case.title}
    for model in NARROWED:
        mine = model.objects.visible_to(mallory)
        assert not mine.filter(pk__in=model.objects.visible_to(alice).values("pk")).exists(), model.__name__
    assert set(m.AIModel.objects.visible_to(alice).values_list("name", flat=True)) == {"Acme CLIP"}
    assert m.Signoff.objects.visible_to(alice).count() == 1 and m.Signoff.objects.visible_to(mallory).count() == 0
    assert m.Evidence.objects.visible_to(alice).count() == 1
    assert list(m.Organisation.objects.visible_to(mallory)) == [globex]
    assert set(m.AuditEvent.objects.visible_to(mallory).values_list("action", flat=True)) == {"case.created"}


def test_it_shows_reviewers_only_the_cases_they_are_assigned(world, rita, ruth, acme):
    acme_case, _ = world
    assert visible_cases(rita) == {acme_case.title}
    assert list(m.AIModel.objects.visible_to(rita).values_list("name", flat=True)) == ["Acme CLIP"]
    assert list(m.ModelVersion.objects.visible_to(rita)) == [acme_case.model_version]
    assert list(m.Organisation.objects.visible_to(rita)) == [acme]
    assert m.EvidenceArtifact.objects.visible_to(rita).count() == 1
    assert m.AuditEvent.objects.visible_to(rita).filter(case__isnull=True).count() == 0
    for model in NARROWED:
        assert not model.objects.visible_to(ruth).exists(), model.__name__


def test_it_shows_auditors_and_admins_everything(world, audrey, ada):
    for user in (audrey, ada):
        for model in NARROWED + [m.Membership, m.AuditChainHead]:
            assert model.objects.visible_to(user).count() == model.objects.count(), (user, model.__name__)


def test_it_shows_nothing_to_strangers(world, make_user, alice):
    from django.contrib.auth.models import AnonymousUser

    nobody = make_user("nobody")
    alice.is_active = False
    alice.save()
    alice._loupe_roles = None
    for user in (AnonymousUser(), None, nobody, alice):
        for model in NARROWED:
            assert not model.objects.visible_to(user).exists(), (user, model.__name__)


def test_it_lets_only_owners_and_admins_edit(draft_case, alice, mallory, rita, audrey, ada, acme):
    assert access.can_edit(alice, draft_case) and access.can_edit(ada, draft_case)
    assert access.can_edit(alice, draft_case.model_version.ai_model)
    for user in (mallory, rita, audrey):
        assert not access.can_edit(user, draft_case)
        assert not access.can_create_for(user, acme)
    assert access.can_create_for(alice, acme)
    workflow.submit(draft_case, by=alice)
    assert not access.can_edit(alice, draft_case), "a submitted case is frozen until changes are requested"
    assert not access.can_edit(ada, draft_case)


def test_it_creates_the_role_groups_with_model_permissions(db):
    def perms(role):
        return set(Group.objects.get(name=role).permissions.values_list("codename", flat=True))

    assert all(codename.startswith("view_") for codename in perms("auditor"))
    assert {"view_auditcase", "view_evidence", "view_auditevent", "view_report"} <= perms("auditor")
    assert {"add_signoff", "sign_off_auditcase"} <= perms("reviewer")
    assert not any(c.startswith(("change_", "delete_")) for c in perms("reviewer"))
    assert {"add_auditcase", "change_auditcase", "add_modelversion"} <= perms("submitter")
    assert not any(c.startswith("delete_") for c in perms("submitter"))
    immutable = {"change_signoff", "delete_signoff", "change_report", "delete_report", "change_auditevent",
                 "delete_auditevent", "change_evidence", "delete_evidence"}
    assert not immutable & perms("admin")


# --- the admin, which narrows with the same function -----------------------------------------------


@pytest.fixture
def staff(world, alice, rita, audrey, ada):
    for user in (alice, rita, audrey, ada):
        user.is_staff = True
        user.save()
    return world


def test_it_narrows_the_admin_lists(staff, client, alice, rita):
    acme_case, globex_case = staff
    client.force_login(alice)
    page = client.get("/admin/governance/auditcase/").content.decode()
    assert acme_case.title in page and globex_case.title not in page
    response = client.get(f"/admin/governance/auditcase/{globex_case.pk}/change/")
    assert response.status_code == 302  # "doesn't exist", like a 404: Globex's case is not leaked

    client.force_login(rita)
    page = client.get("/admin/governance/auditcase/").content.decode()
    assert acme_case.title in page and globex_case.title not in page


def test_it_lets_auditors_look_but_not_touch_in_the_admin(staff, client, audrey):
    acme_case, globex_case = staff
    client.force_login(audrey)
    for case in (acme_case, globex_case):
        page = client.get(f"/admin/governance/auditcase/{case.pk}/change/")
        assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
    response = client.post(f"/admin/governance/auditcase/{acme_case.pk}/change/", {"title": "Renamed"})
    assert response.status_code == 403
    acme_case.refresh_from_db()
    assert acme_case.title == "Acme CLIP 1.0 grounding audit"


def test_it_offers_no_change_or_delete_for_immutable_records_in_the_admin(staff, client, ada):
    client.force_login(ada)
    signoff = m.Signoff.objects.get()
    event = m.AuditEvent.objects.first()
    assert client.get(f"/admin/governance/signoff/{signoff.pk}/delete/").status_code == 403
    assert client.get("/admin/governance/signoff/add/").status_code == 403
    assert client.get(f"/admin/governance/auditevent/{event.pk}/delete/").status_code == 403
    page = client.get(f"/admin/governance/auditevent/{event.pk}/change/").content.decode()
    assert event.row_hash in page and 'name="_save"' not in page
    response = client.post("/admin/governance/signoff/",
                           {"action": "delete_selected", "_selected_action": [signoff.pk]})
    assert m.Signoff.objects.filter(pk=signoff.pk).exists() and response.status_code in (200, 302)


def test_it_logs_admin_edits_and_checks_reviewer_conflicts(staff, client, ada, make_user, globex, rita):
    acme_case, globex_case = staff
    client.force_login(ada)
    carol = make_user("carol", "reviewer", globex)  # works for the provider: not independent
    url = f"/admin/governance/auditcase/{globex_case.pk}/change/"
    form = {"model_version": globex_case.model_version_id, "title": "Globex BLIP audit (v2)", "scope": "",
            "probe_plan": '[{"kind": "test.echo", "params": {}}]', "required_approvals": 2,
            "runs-TOTAL_FORMS": 0, "runs-INITIAL_FORMS": 0, "signoffs-TOTAL_FORMS": 0, "signoffs-INITIAL_FORMS": 0}
    response = client.post(url, {**form, "reviewers": [rita.pk, carol.pk]})
    assert response.status_code == 200 and "segregation of duties" in response.content.decode()

    client.post(url, {**form, "reviewers": [rita.pk]})
    globex_case.refresh_from_db()
    assert globex_case.title == "Globex BLIP audit (v2)"
    assert list(globex_case.reviewers.all()) == [rita]
    actions = list(m.AuditEvent.objects.filter(case=globex_case).values_list("action", flat=True))
    assert actions[-2:] == ["auditcase.updated", "case.reviewers_assigned"]
