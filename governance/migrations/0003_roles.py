"""Create the role groups (submitter, reviewer, auditor, admin) with their model permissions.

The definitions live in ``governance.access.ROLE_PERMISSIONS``; ``sync_roles`` also runs after every
``migrate`` so permissions of models added later are granted too.
"""

from django.db import migrations


def create_roles(apps, schema_editor):
    from governance.access import sync_roles

    sync_roles(apps)


def remove_roles(apps, schema_editor):
    from governance.access import ROLES

    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0002_immutability_triggers"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_roles, remove_roles)]
