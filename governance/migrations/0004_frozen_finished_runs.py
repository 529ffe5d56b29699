"""PostgreSQL: a finished probe run (succeeded, failed, cancelled) can be neither updated nor deleted.

Evidence is frozen once its run finished (``0002``); without this trigger a raw ``UPDATE`` could set
the run back to ``running`` and reopen its evidence. Other databases rely on the ORM guards.
"""

from django.db import migrations

FORWARD = [
    """
    CREATE OR REPLACE FUNCTION loupe_refuse_finished_run_change() RETURNS trigger AS $$
    BEGIN
        IF OLD.status IN ('succeeded', 'failed', 'cancelled') THEN
            RAISE EXCEPTION 'Loupe: probe run % finished (%); % refused', OLD.id, OLD.status, TG_OP
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
    CREATE TRIGGER governance_proberun_frozen BEFORE UPDATE OR DELETE ON governance_proberun
    FOR EACH ROW EXECUTE FUNCTION loupe_refuse_finished_run_change();
    """,
]
BACKWARD = [
    "DROP TRIGGER IF EXISTS governance_proberun_frozen ON governance_proberun;",
    "DROP FUNCTION IF EXISTS loupe_refuse_finished_run_change();",
]


def _run(statements):
    def apply(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return
        for statement in statements:
            schema_editor.execute(statement, params=None)

    return apply


class Migration(migrations.Migration):
    dependencies = [("governance", "0003_roles")]

    operations = [migrations.RunPython(_run(FORWARD), _run(BACKWARD), elidable=False)]
