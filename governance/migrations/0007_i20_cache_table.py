"""The database cache table (throttle counters on the embedded default; a no-op with Redis)."""

from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor):
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [("governance", "0006_i21_run_lease_report_requests")]

    operations = [migrations.RunPython(create_cache_table, migrations.RunPython.noop, elidable=True)]
