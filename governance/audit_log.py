"""The append-only, hash-chained audit log.

Write with :func:`record` inside the transaction that makes the change (state transitions, sign-offs,
uploads, reports...): if the change rolls back, so does its log row. Each row stores

- ``payload``: canonical JSON text, and ``payload_hash`` = SHA-256 of exactly those bytes;
- ``prev_hash``: the previous row's ``row_hash`` (``"0" * 64`` for the first row);
- ``row_hash`` = SHA-256 of the canonical JSON of every other column (seq, time, actor, action,
  object, organisation, case, payload hash, prev hash): see :func:`row_hash_of`.

Writers lock the single :class:`~governance.models.AuditChainHead` row (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite serialises writers anyway), so two concurrent transactions can never both append
after the same row; ``seq``, ``prev_hash`` and ``row_hash`` are also unique in the database.

:func:`verify` walks the chain and names every modified, deleted, inserted or reordered row; the
head row also catches a deleted tail (the last rows removed). ``manage.py verify_audit_log`` runs it.

Limits, stated plainly: an unkeyed hash chain proves the log is *internally consistent*. Someone
with write access to the database who recomputes every hash after their change, including the head,
produces a consistent forgery. Anchoring the head hash outside the database is what makes that
detectable: every issued report carries the head at issuance (:func:`anchor`) in its embedded,
hashed and signed manifest and prints it on its cover, and ``manage.py verify_report`` checks the
log against it (:func:`check_anchor`). A rewrite of any row up to that point then changes a hash the
signed PDF in someone else's hands still states.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.db.models import Model
from django.utils import timezone

from governance.canonical import canonical_json, sha256_hex
from governance.models import (
    AIModel,
    AuditCase,
    AuditChainHead,
    AuditEvent,
    Evidence,
    EvidenceArtifact,
    ModelVersion,
    Organisation,
)
from loupe_verify import chain

GENESIS_HASH = AuditEvent.GENESIS_HASH
HEAD_PK = 1

ROW_FIELDS = ("id", "seq", "created_at", "actor_id", "actor_label", "action", "object_type", "object_id",
              "organisation_id", "case_id", "payload", "payload_hash", "prev_hash", "row_hash")


def _timestamp(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def row_hash_of(row: dict[str, Any]) -> str:
    """The row hash of an audit-log row given as a dict with the columns in :data:`ROW_FIELDS`.

    ``created_at`` may be a datetime or its ISO string as exported in excerpts. The rule itself lives
    in :func:`loupe_verify.chain.row_hash_of`, which the offline verifier shares.
    """
    created = row["created_at"]
    return chain.row_hash_of({**row, "created_at": _timestamp(created) if isinstance(created, dt.datetime)
                              else created})


def _case_and_organisation(obj: Model | None) -> tuple[AuditCase | None, int | None]:
    """Attribute an object to its case and organisation, so excerpts and visibility work per case."""
    case = None
    if isinstance(obj, AuditCase):
        case = obj
    elif isinstance(obj, Evidence):
        case = obj.run.case
    elif isinstance(obj, EvidenceArtifact):
        case = obj.evidence.run.case
    elif obj is not None and getattr(obj, "case_id", None) is not None and hasattr(obj, "case"):
        case = obj.case
    if case is not None:
        return case, case.model_version.ai_model.organisation_id
    if isinstance(obj, Organisation):
        return None, obj.pk
    if isinstance(obj, AIModel):
        return None, obj.organisation_id
    if isinstance(obj, ModelVersion):
        return None, obj.ai_model.organisation_id
    return None, getattr(obj, "organisation_id", None)


def record(actor, action: str, obj: Model | None = None, payload: dict[str, Any] | None = None) -> AuditEvent:
    """Append one event to the audit log and return it.

    ``actor``: the user who acted, or ``None`` for the system (a worker, a scheduled job).
    ``action``: a dotted verb such as ``"case.submitted"``, ``"signoff.created"``, ``"report.issued"``.
    ``obj``: the object acted on (its model name and pk are stored; its case and organisation are
    derived so per-case excerpts and per-organisation visibility work).
    ``payload``: JSON-serialisable details (no NaN); stored as canonical JSON and hashed.

    Call it inside the ``transaction.atomic()`` block that makes the change. It opens its own
    (nested) atomic block and locks the chain head until the outer transaction ends.
    """
    payload_text = canonical_json(payload or {}).decode("utf-8")
    case, organisation_id = _case_and_organisation(obj)
    if actor is not None and not getattr(actor, "is_authenticated", False):
        actor = None  # AnonymousUser never acts; treat as system
    with transaction.atomic():
        head, _ = AuditChainHead.objects.select_for_update().get_or_create(pk=HEAD_PK)
        row = {
            "seq": head.seq + 1,
            "created_at": timezone.now(),
            "actor_id": actor.pk if actor is not None else None,
            "actor_label": actor.get_username() if actor is not None else "system",
            "action": action,
            "object_type": obj._meta.model_name if obj is not None else "",
            "object_id": str(obj.pk) if obj is not None and obj.pk is not None else "",
            "organisation_id": organisation_id,
            "case_id": case.pk if case is not None else None,
            "payload_hash": sha256_hex(payload_text.encode("utf-8")),
            "prev_hash": head.row_hash,
        }
        row["row_hash"] = row_hash_of(row)
        event = AuditEvent(payload=payload_text, **row)
        event._via_record = True  # AuditEvent.save() refuses rows written any other way
        event.save(force_insert=True)
        head.seq = event.seq
        head.row_hash = event.row_hash
        head.save(update_fields=["seq", "row_hash", "updated_at"])
    return event


def head() -> AuditChainHead | None:
    return AuditChainHead.objects.filter(pk=HEAD_PK).first()


def anchor() -> dict[str, Any] | None:
    """The chain head as ``{"seq", "row_hash"}`` for an external record (a report's manifest); None
    while the log is empty. The row hash commits to every row up to ``seq``."""
    chain_head = head()
    if chain_head is None or chain_head.seq == 0:
        return None
    return {"seq": chain_head.seq, "row_hash": chain_head.row_hash}


def check_anchor(anchored: dict[str, Any]) -> list[Problem]:
    """Check the log against a head recorded outside the database (``anchor()``'s dict): the rows up to
    ``anchored["seq"]`` must still form an unbroken chain that ends in ``anchored["row_hash"]``.

    Catches what :func:`verify` alone cannot: a log rewritten with every hash recomputed, head
    included. Rows written after the anchor are not checked here (:func:`verify` covers them)."""
    try:
        seq, row_hash = int(anchored["seq"]), str(anchored["row_hash"])
    except (KeyError, TypeError, ValueError):
        return [Problem("head", None, None, f"unreadable audit-log anchor {anchored!r}")]
    rows = AuditEvent.objects.filter(seq__lte=seq).order_by("seq").values(*ROW_FIELDS).iterator(chunk_size=2000)
    problems = verify_rows(rows)  # the chain up to the anchor, as verify() checks it ...
    at_anchor = AuditEvent.objects.filter(seq=seq).values_list("row_hash", flat=True).first()
    if at_anchor != row_hash:
        now = f"now {at_anchor[:16]}..." if at_anchor else "that row is gone"
        # ... and where it ends: a consistent rewrite passes the walk above but not this
        problems.insert(0, Problem("head", seq, None, f"the anchored head was seq {seq} with row hash "
                                                      f"{row_hash[:16]}...; {now}: the log up to there was rewritten"))
    return problems


def event_as_dict(event: AuditEvent | dict[str, Any]) -> dict[str, Any]:
    """An audit-log row as plain JSON (what excerpts and export bundles carry); verifiable without
    database access with :func:`verify_excerpt` (some rows) or :func:`verify_rows` (the whole log)."""
    row = event if isinstance(event, dict) else {name: getattr(event, name) for name in ROW_FIELDS}
    return {**row, "created_at": _timestamp(row["created_at"]) if isinstance(row["created_at"], dt.datetime)
            else row["created_at"]}


def excerpt(case: AuditCase) -> list[dict[str, Any]]:
    """Every row about ``case``, as dicts with their hashes (rows are not contiguous, so links to
    rows outside the excerpt cannot be checked without the full log; each row's own hashes can)."""
    return [event_as_dict(e) for e in AuditEvent.objects.filter(case=case).order_by("seq").values(*ROW_FIELDS)]


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One verification failure. ``kind``: modified, deleted, inserted, reordered or head."""

    kind: str
    seq: int | None
    row_id: int | None
    message: str

    def __str__(self) -> str:
        where = f"seq {self.seq} (id {self.row_id})" if self.seq is not None else "chain"
        return f"{where}: {self.kind}: {self.message}"


def _seq_range(first: int, last: int) -> str:
    return f"seq {first} was" if first == last else f"seq {first}..{last} were"


def _moved(written_at: int, seq: int) -> str:
    return f"it was written as seq {written_at} and now sits at seq {seq}"


def verify_rows(rows: Iterable[dict[str, Any]], head_seq: int | None = None,
                head_hash: str | None = None, progress: Any = None) -> list[Problem]:
    """Verify audit-log rows (dicts with :data:`ROW_FIELDS`, in ``seq`` order) against each other
    and, when given, the chain head. Returns the problems found (empty: the log verifies)."""
    rows = list(rows)
    problems: list[Problem] = []
    by_prev: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_prev.setdefault(row["prev_hash"], row)
    known_hashes = {row["row_hash"] for row in rows}

    # Walk the chain as it was written: from the genesis hash, follow each row to the row that
    # names it as predecessor. A row's walk position is the seq it was written with.
    walk_pos: dict[int, int] = {}
    current, position = GENESIS_HASH, 0
    while current in by_prev:
        row = by_prev[current]
        if row["id"] in walk_pos:  # a cycle can only come from tampering; stop walking
            break
        position += 1
        walk_pos[row["id"]] = position
        current = row["row_hash"]
    walk_length = position

    previous = None
    for row in rows:
        if progress is not None:
            progress.update(1)
        seq, rid = row["seq"], row["id"]
        if sha256_hex(row["payload"].encode("utf-8")) != row["payload_hash"]:
            problems.append(Problem("modified", seq, rid, "its payload no longer matches its payload hash"))
        hash_ok = row_hash_of(row) == row["row_hash"]
        written_at = walk_pos.get(rid)
        if not hash_ok:
            if (written_at is not None and written_at != seq
                    and row_hash_of({**row, "seq": written_at}) == row["row_hash"]):
                problems.append(Problem("reordered", seq, rid, _moved(written_at, seq)))
            else:
                problems.append(Problem("modified", seq, rid, "its columns no longer match its row hash"))

        expected_seq = previous["seq"] + 1 if previous else 1
        if seq > expected_seq:
            problems.append(Problem("deleted", seq, rid,
                                    f"{_seq_range(expected_seq, seq - 1)} missing before this row"))
        elif written_at is None:
            if row["prev_hash"] in known_hashes or row["prev_hash"] == GENESIS_HASH:
                pass  # linked to a row that is itself cut off from the chain: reported at the cut
            elif not hash_ok:
                problems.append(Problem("modified", seq, rid, "its link to the previous row was altered"))
            elif previous is not None and walk_pos.get(previous["id"]) == walk_length:
                # The chain stops at the previous row: that row was rewritten with recomputed hashes,
                # so this (intact) row's link to it no longer matches.
                problems.append(Problem("modified", previous["seq"], previous["id"],
                                        f"it was rewritten: the next row (seq {seq}) was chained to a different "
                                        "version of it"))
            else:
                problems.append(Problem("inserted", seq, rid,
                                        "it is not linked into the chain: its previous-row hash matches no row"))
        elif (previous is not None and previous["row_hash"] != row["prev_hash"] and hash_ok
              and written_at != seq):
            # Intact row, but it was chained after another row than the one now before it.
            problems.append(Problem("reordered", seq, rid, _moved(written_at, seq)))
        previous = row

    if head_seq is not None:
        problems.extend(_check_head(rows, head_seq, head_hash, walk_pos, walk_length))
    return problems


def _check_head(rows: list[dict[str, Any]], head_seq: int, head_hash: str | None, walk_pos: dict[int, int],
                walk_length: int) -> list[Problem]:
    """Compare the chain with its head: catches a deleted tail and rows appended behind record()."""
    if not rows:
        return [Problem("deleted", None, None, f"the log is empty but its head records {head_seq} rows")] \
            if head_seq > 0 else []
    head_row = next((r for r in rows if r["row_hash"] == head_hash), None)
    if head_row is None:
        if len(walk_pos) == len(rows) and head_seq > walk_length:
            return [Problem("deleted", None, None, f"the chain ends at seq {walk_length} but its head records "
                                                   f"seq {head_seq}: {_seq_range(walk_length + 1, head_seq)} deleted")]
        return [Problem("head", None, None, f"the chain head (seq {head_seq}) matches no row")]
    # If the walk broke earlier (reported above), the head row may be unreachable; its seq still counts.
    place = walk_pos.get(head_row["id"], head_row["seq"] if len(walk_pos) < len(rows) else None)
    if place != head_seq:
        return [Problem("head", head_row["seq"], head_row["id"],
                        f"the chain head records seq {head_seq} but this row is not at that place in the chain")]
    return [Problem("inserted", r["seq"], r["id"],
                    f"appended after the chain head (seq {head_seq}) without audit_log.record()")
            for r in rows if walk_pos.get(r["id"], 0) > head_seq]


def verify(progress: bool = False) -> list[Problem]:
    """Verify the whole audit log in the database against itself and its head."""
    from tqdm import tqdm

    chain_head = head()
    total = AuditEvent.objects.count()
    missing_head = []
    if chain_head is None and total:
        missing_head = [Problem("head", None, None, "the chain head row is missing")]
    bar = tqdm(total=total, desc="verifying audit log", unit="row", disable=None if progress else True)
    rows = AuditEvent.objects.order_by("seq").values(*ROW_FIELDS).iterator(chunk_size=2000)
    try:
        return missing_head + verify_rows(rows, head_seq=chain_head.seq if chain_head else None,
                                          head_hash=chain_head.row_hash if chain_head else None, progress=bar)
    finally:
        bar.close()


def verify_excerpt(rows: Iterable[dict[str, Any]]) -> list[Problem]:
    """Verify some rows of the log (e.g. one case's excerpt): each row's payload and row hash, and the
    link between rows with consecutive ``seq``. Gaps are expected in an excerpt and not reported."""
    problems: list[Problem] = []
    previous = None
    for row in sorted(rows, key=lambda r: r["seq"]):
        seq, rid = row["seq"], row["id"]
        if sha256_hex(row["payload"].encode("utf-8")) != row["payload_hash"]:
            problems.append(Problem("modified", seq, rid, "its payload no longer matches its payload hash"))
        if row_hash_of(row) != row["row_hash"]:
            problems.append(Problem("modified", seq, rid, "its columns no longer match its row hash"))
        if previous is not None and previous["seq"] + 1 == seq and previous["row_hash"] != row["prev_hash"]:
            problems.append(Problem("modified", seq, rid, f"it is not chained to seq {previous['seq']}"))
        previous = row
    return problems


def payload_of(event: AuditEvent) -> Any:
    return json.loads(event.payload)
