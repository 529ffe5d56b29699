"""Defence in depth for immutable records: PostgreSQL triggers refuse UPDATE and DELETE at the SQL level.

The ORM already refuses (``governance.models.ImmutableError``); these triggers also stop a raw
``UPDATE``/``DELETE`` from a database shell or a bug that bypasses the ORM. Other databases (SQLite for
the embedded default) rely on the ORM guards only. ``TRUNCATE`` is deliberately not blocked: test
databases are flushed with it, and only the database owner can run it.
"""

from django.db import migrations

APPEND_ONLY_TABLES = [
    "governance_auditevent",
    "governance_signoff",
    "governance_report",
    "governance_evidenceartifact",
]

FORWARD = [
    """
    CREATE OR REPLACE FUNCTION loupe_refuse_change() RETURNS trigger AS $$
    BEGIN
        RAISE EXCEPTION 'Loupe: rows of % are immutable; % refused', TG_TABLE_NAME, TG_OP
            USING ERRCODE = 'restrict_violation';
    END;
    $$ LANGUAGE plpgsql;
    """,
    """
    CREATE OR REPLACE FUNCTION loupe_refuse_finished_evidence_change() RETURNS trigger AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM governance_proberun
                   WHERE id = OLD.run_id AND status IN ('succeeded', 'failed', 'cancelled')) THEN
            RAISE EXCEPTION 'Loupe: evidence % belongs to a finished run; % refused', OLD.id, TG_OP
                USING ERRCODE = 'restrict_violation';
        END IF;
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        RETURN NEW;
    END;
    $$ LANGUAGE plpgsql;
    """,
    """
    CREATE TRIGGER governance_evidence_frozen BEFORE UPDATE OR DELETE ON governance_evidence
    FOR EACH ROW EXECUTE FUNCTION loupe_refuse_finished_evidence_change();
    """,
] + [
    f"""
    CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION loupe_refuse_change();
    """
    for table in APPEND_ONLY_TABLES
]

BACKWARD = [f"DROP TRIGGER IF EXISTS {table}_immutable ON {table};" for table in APPEND_ONLY_TABLES] + [
    "DROP TRIGGER IF EXISTS governance_evidence_frozen ON governance_evidence;",
    "DROP FUNCTION IF EXISTS loupe_refuse_finished_evidence_change();",
    "DROP FUNCTION IF EXISTS loupe_refuse_change();",
]


def _run(statements):
    def apply(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return
        for statement in statements:
            schema_editor.execute(statement, params=None)

    return apply


class Migration(migrations.Migration):
    dependencies = [("governance", "0001_initial")]

    operations = [migrations.RunPython(_run(FORWARD), _run(BACKWARD), elidable=False)]
