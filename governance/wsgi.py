import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")
application = get_wsgi_application()

# Without a broker, probe runs started from the browser proceed in a background thread of this
# process instead of inside the request (workers/local.py); with one, Celery workers take them.
from workers import local  # noqa: E402

local.enable()
