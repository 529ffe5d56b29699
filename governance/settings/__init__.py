"""Loupe settings, read from environment variables.

The defaults are the *embedded* profile a newcomer gets with no servers:
SQLite in ``var/`` and Celery tasks executed in-process. Production and CI
set ``DATABASE_URL`` (PostgreSQL) and ``CELERY_BROKER_URL`` (Redis).
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


VAR_DIR = Path(os.environ.get("LOUPE_VAR_DIR", BASE_DIR / "var"))
# The embedded default keeps its SQLite file, media and caches here; create it on first start.
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("SECRET_KEY", "loupe-insecure-development-key-do-not-use-in-production")
DEBUG = env_bool("DEBUG", True)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,testserver")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    "governance",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # A Content-Security-Policy on every response (governance/csp.py).
    "governance.csp.ContentSecurityPolicyMiddleware",
    # Bidirectional control characters in provider text are removed from HTML (governance/text.py).
    "governance.text.BidiControlMiddleware",
    # Below /api/, every error is {"error", "detail"} JSON, whatever raised it (governance/api/errors.py).
    "governance.api.errors.ApiErrorMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Login lockout (last, as django-axes requires): governance/login_guard.py.
    "axes.middleware.AxesMiddleware",
]

# django-axes first: it refuses a locked-out client before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

# --- Client address, throttling and login lockout -------------------------------------------------
# How many reverse proxies in front of Loupe append the client to X-Forwarded-For (0: the header is
# ignored). Throttle and lockout key on the address this yields (governance/client_ip.py).
LOUPE_TRUSTED_PROXIES = int(os.environ.get("LOUPE_TRUSTED_PROXIES", "0"))
# Throttle counters live in the default cache, which every process must share: Redis when
# LOUPE_CACHE_URL is set (production), else a table in the database (`manage.py createcachetable`,
# which the migrations also run).
LOUPE_CACHE_URL = os.environ.get("LOUPE_CACHE_URL", "")
CACHES = {
    "default": ({"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": LOUPE_CACHE_URL}
                if LOUPE_CACHE_URL else
                {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "loupe_cache"}),
}
# Failed logins per client address before a lockout, and how long it lasts (hours). Lift it early
# with `manage.py axes_reset` (or axes_reset_ip ADDRESS / axes_reset_username NAME).
AXES_FAILURE_LIMIT = int(os.environ.get("LOUPE_LOGIN_FAILURE_LIMIT", "10"))
AXES_COOLOFF_TIME = float(os.environ.get("LOUPE_LOGIN_LOCKOUT_HOURS", "1"))
AXES_LOCKOUT_PARAMETERS = ["ip_address"]
AXES_CLIENT_IP_CALLABLE = "governance.client_ip.client_ip"
AXES_LOCKOUT_CALLABLE = "governance.login_guard.lockout_response"
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False

ROOT_URLCONF = "governance.urls"
WSGI_APPLICATION = "governance.wsgi.application"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "landing"
LOGOUT_REDIRECT_URL = "landing"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'loupe.sqlite3'}"),
        conn_max_age=int(os.environ.get("DB_CONN_MAX_AGE", "0")),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The embedded default serves concurrent requests from one SQLite file: a writer waits for the
    # lock (busy timeout, seconds) instead of failing with "database is locked", and transactions
    # take the write lock when they begin (IMMEDIATE), because SQLite cannot wait when a reader
    # upgrades to a writer mid-transaction. WAL lets readers go on while one request writes.
    DATABASES["default"].setdefault("OPTIONS", {}).update({
        "timeout": int(os.environ.get("LOUPE_SQLITE_BUSY_TIMEOUT", "30")),
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    })
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", VAR_DIR / "static"))
STATICFILES_DIRS = [BASE_DIR / "governance" / "static"]

# Evidence artifacts, uploaded model archives and reports go through Django's
# storage API, so any django-storages backend can be configured instead.
MEDIA_ROOT = Path(os.environ.get("LOUPE_STORAGE_ROOT", VAR_DIR / "media"))
MEDIA_URL = "media/"
STORAGES = {
    "default": {"BACKEND": os.environ.get("LOUPE_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage")},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# Upload limits (bytes). Model archives are large; request bodies other than
# uploads stay small.
LOUPE_MAX_ARCHIVE_BYTES = int(os.environ.get("LOUPE_MAX_ARCHIVE_BYTES", str(2 * 1024**3)))
LOUPE_MAX_UNPACKED_BYTES = int(os.environ.get("LOUPE_MAX_UNPACKED_BYTES", str(8 * 1024**3)))
LOUPE_MAX_IMAGE_PIXELS = int(os.environ.get("LOUPE_MAX_IMAGE_PIXELS", str(40_000_000)))
LOUPE_MAX_ARCHIVE_FILES = int(os.environ.get("LOUPE_MAX_ARCHIVE_FILES", "2000"))
# Declared unpacked bytes per compressed byte, per archive member and overall (0: unchecked). Real
# weights barely compress; a decompression bomb compresses a thousandfold.
LOUPE_MAX_COMPRESSION_RATIO = float(os.environ.get("LOUPE_MAX_COMPRESSION_RATIO", "100"))
# Bytes of uploaded models (archives plus unpacked files) one organisation may store (0: no quota).
LOUPE_ORGANISATION_QUOTA_BYTES = int(os.environ.get("LOUPE_ORGANISATION_QUOTA_BYTES", str(64 * 1024**3)))
DATA_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("DATA_UPLOAD_MAX_MEMORY_SIZE", str(10 * 1024**2)))
FILE_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("FILE_UPLOAD_MAX_MEMORY_SIZE", str(10 * 1024**2)))
# The Content-Security-Policy header (governance/csp.py holds the default; empty: none is sent).
LOUPE_CONTENT_SECURITY_POLICY = os.environ.get("LOUPE_CONTENT_SECURITY_POLICY", __import__(
    "governance.csp", fromlist=["DEFAULT_POLICY"]).DEFAULT_POLICY)
# JSON request bodies nested deeper than this are refused (400) before anything walks them.
LOUPE_MAX_JSON_DEPTH = int(os.environ.get("LOUPE_MAX_JSON_DEPTH", "64"))
# Server-side model directories may only be registered from below these roots.
LOUPE_MODEL_ROOTS = env_list("LOUPE_MODEL_ROOTS", str(VAR_DIR / "models"))
# Plan datasets (a probe's ``dataset`` and ``params.inputs``) may only name directories below these.
LOUPE_DATASET_ROOTS = env_list("LOUPE_DATASET_ROOTS", str(VAR_DIR / "datasets"))

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "governance.api.schema.LoupeAutoSchema",
    "EXCEPTION_HANDLER": "governance.api.errors.exception_handler",
    "DEFAULT_PARSER_CLASSES": [
        "governance.api.parsers.DepthLimitedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "ORDERING_PARAM": "ordering",
    # Only the token endpoint is throttled (password guessing), per client address (LOUPE_TRUSTED_PROXIES);
    # see governance.api.views.ObtainTokenView. Lockout after repeated failures: AXES_* below.
    "DEFAULT_THROTTLE_RATES": {"login": os.environ.get("LOUPE_TOKEN_THROTTLE", "30/minute")},
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Loupe API",
    "DESCRIPTION": "Audit vision-language models: inventory, cases, probe runs, evidence, sign-offs and reports.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Separate request and response components: read-only fields are neither required nor sent.
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI assets are served from our own static files, never a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Celery -----------------------------------------------------------------
# Without a broker URL tasks run eagerly, in-process: the embedded default.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "")
# Brokers: Redis (redis://) or RabbitMQ (amqp://, kombu's pyamqp). The pipeline needs no task results
# (runs record their outcome in the database); they serve callers that wait for one (tests, the
# admin). On Redis the broker's own database keeps them, on RabbitMQ they travel back as messages
# to the caller (rpc://). Results are small and expire in a day.
_DEFAULT_RESULT_BACKEND = (CELERY_BROKER_URL if CELERY_BROKER_URL.startswith(("redis://", "rediss://"))
                           else "rpc://" if CELERY_BROKER_URL.startswith(("amqp://", "amqps://", "pyamqp://"))
                           else "")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", _DEFAULT_RESULT_BACKEND)
CELERY_RESULT_EXPIRES = 24 * 3600
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = True
LOUPE_TASK_SOFT_TIME_LIMIT = int(os.environ.get("LOUPE_TASK_SOFT_TIME_LIMIT", "1800"))
LOUPE_TASK_TIME_LIMIT = int(os.environ.get("LOUPE_TASK_TIME_LIMIT", "2100"))
CELERY_TASK_SOFT_TIME_LIMIT = LOUPE_TASK_SOFT_TIME_LIMIT
CELERY_TASK_TIME_LIMIT = LOUPE_TASK_TIME_LIMIT
# JSON only: a pickle-accepting worker executes whatever lands in the broker.
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# A task is acknowledged only after it finished, and a worker that dies (SIGKILL, OOM) hands its
# task back to the broker instead of losing it. Tasks must therefore be idempotent.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# One task at a time per process: probe tasks are long, and prefetching would park work on a
# busy worker while another idles (and lose the prefetched messages' ordering on a crash).
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Redis re-delivers unacknowledged messages after the visibility timeout; it must exceed the
# hard time limit, or a long but healthy task would be delivered to a second worker.
# Workers sweep Redis for such abandoned messages every `unacked_restore_interval` seconds, but
# kombu (5.7) only really scans on every `unacked_restore_throttle`-th sweep, 10 x 10 s by default:
# with that, a task of a SIGKILLed worker came back up to ~100 s after its visibility timeout had
# passed. One sweep every LOUPE_BROKER_RESTORE_INTERVAL seconds, each a real (cheap) ZRANGE scan,
# bounds redelivery at visibility timeout + that interval.
LOUPE_BROKER_RESTORE_INTERVAL = int(os.environ.get("LOUPE_BROKER_RESTORE_INTERVAL", "10"))
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": int(os.environ.get("LOUPE_BROKER_VISIBILITY_TIMEOUT", str(LOUPE_TASK_TIME_LIMIT + 600))),
    "unacked_restore_interval": LOUPE_BROKER_RESTORE_INTERVAL,
    "unacked_restore_throttle": 1,
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Run leases and recovery (workers/runtime.py, governance/pipeline.py recover_runs): a claimed run
# is leased for LOUPE_RUN_LEASE_SECONDS and renewed by a heartbeat every third of that; a run
# whose lease lapsed, or that sat queued LOUPE_RUN_REDISPATCH_AFTER seconds without a worker
# claiming it (a message the broker lost), is dispatched again by the sweeper, which runs every
# LOUPE_SWEEP_INTERVAL seconds (Celery beat) and when a worker starts. A run that lost its worker
# LOUPE_RUN_MAX_ATTEMPTS times, or met transient errors for LOUPE_RUN_RETRY_WINDOW seconds, fails
# with the reason.
LOUPE_RUN_LEASE_SECONDS = float(os.environ.get("LOUPE_RUN_LEASE_SECONDS", "60"))
LOUPE_RUN_REDISPATCH_AFTER = float(os.environ.get("LOUPE_RUN_REDISPATCH_AFTER", "600"))
LOUPE_RUN_MAX_ATTEMPTS = int(os.environ.get("LOUPE_RUN_MAX_ATTEMPTS", "5"))
LOUPE_RUN_RETRY_WINDOW = float(os.environ.get("LOUPE_RUN_RETRY_WINDOW", "600"))
LOUPE_RUN_RETRY_MAX_DELAY = float(os.environ.get("LOUPE_RUN_RETRY_MAX_DELAY", "30"))
LOUPE_SWEEP_INTERVAL = float(os.environ.get("LOUPE_SWEEP_INTERVAL", "60"))
CELERY_TASK_DEFAULT_QUEUE = "cpu"
CELERY_TASK_CREATE_MISSING_QUEUES = True
CELERY_TASK_ROUTES = ("workers.celery.route_task",)
CELERY_TASK_TRACK_STARTED = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Report signing (governance/reports/signing.py) ---------------------------------------------
# The service signs each issued report (PAdES) with this key when both files exist; reviewers and
# approvers countersign with their own keys (manage.py sign_report). `manage.py make_signing_key`
# writes a development CA and issuer key to these default paths. Production: point these at the
# real key/certificate; the key's passphrase is read from the environment variable named below.
LOUPE_SIGNING_DIR = Path(os.environ.get("LOUPE_SIGNING_DIR", VAR_DIR / "signing"))
LOUPE_SIGNING_KEY = os.environ.get("LOUPE_SIGNING_KEY", str(LOUPE_SIGNING_DIR / "issuer-key.pem"))
LOUPE_SIGNING_CERT = os.environ.get("LOUPE_SIGNING_CERT", str(LOUPE_SIGNING_DIR / "issuer-cert.pem"))
LOUPE_SIGNING_KEY_PASSPHRASE_ENV = "LOUPE_SIGNING_KEY_PASSPHRASE"
LOUPE_SIGNING_CA_CHAIN = env_list("LOUPE_SIGNING_CA_CHAIN", str(LOUPE_SIGNING_DIR / "dev-ca-cert.pem"))
# verify_report accepts signatures that chain to one of these certificates.
LOUPE_SIGNING_TRUST_ROOTS = env_list("LOUPE_SIGNING_TRUST_ROOTS", str(LOUPE_SIGNING_DIR / "dev-ca-cert.pem"))
# RFC 3161 timestamp authority: when set, every signature carries its timestamp (PAdES B-T).
LOUPE_TSA_URL = os.environ.get("LOUPE_TSA_URL", "")
LOUPE_TSA_TIMEOUT = int(os.environ.get("LOUPE_TSA_TIMEOUT", "10"))

# Notifications (governance/notifications.py): e-mail through Django's mail backend, signed webhooks.
# Without a mail server named (LOUPE_EMAIL_HOST), mails are written as files into var/mail/: the
# embedded default has no SMTP server, and a refused connection would only fill the log.
EMAIL_HOST = os.environ.get("LOUPE_EMAIL_HOST", "")
EMAIL_BACKEND = os.environ.get("LOUPE_EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST
                               else "django.core.mail.backends.filebased.EmailBackend")
EMAIL_FILE_PATH = os.environ.get("LOUPE_EMAIL_FILE_PATH", str(VAR_DIR / "mail"))
EMAIL_PORT = int(os.environ.get("LOUPE_EMAIL_PORT", "25"))
DEFAULT_FROM_EMAIL = os.environ.get("LOUPE_FROM_EMAIL", "loupe@localhost")
# Webhook URLs resolving to loopback/private addresses are refused (SSRF) unless this is set.
LOUPE_WEBHOOK_ALLOW_PRIVATE = os.environ.get("LOUPE_WEBHOOK_ALLOW_PRIVATE", "") == "1"
LOUPE_WEBHOOK_TIMEOUT = float(os.environ.get("LOUPE_WEBHOOK_TIMEOUT", "10"))
LOUPE_WEBHOOK_MAX_ATTEMPTS = int(os.environ.get("LOUPE_WEBHOOK_MAX_ATTEMPTS", "6"))
LOUPE_WEBHOOK_RETRY_DELAY = float(os.environ.get("LOUPE_WEBHOOK_RETRY_DELAY", "30"))
LOUPE_WEBHOOK_RETRY_MAX_DELAY = float(os.environ.get("LOUPE_WEBHOOK_RETRY_MAX_DELAY", "3600"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
}
