# One image for both services (see docker-compose.yml for the whole system):
#   docker build -t clinic-billing .
#   docker run -e DATABASE_URL=... -p 8080:8080 clinic-billing                          # appointments API
#   docker run -e DATABASE_URL=... -p 8081:8081 clinic-billing python billing_worker.py # billing worker
# Nothing secret is in the image: DATABASE_URL (or libpq's PGPASSWORD) comes at run time.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The locked dependencies in their own layer, rebuilt only when requirements.lock changes (it is
# copied before the code). requirements.lock (`make lock`, from requirements.txt) pins every runtime
# package, direct and transitive, with the sha256 of each of its files: --require-hashes refuses any
# file that does not match, and --no-deps installs nothing the lock does not list (pip check then
# proves nothing is missing). Wheels only (--only-binary): nothing is compiled, so no compiler or
# unpinned build dependency is ever installed, and --no-cache-dir leaves no pip cache behind.
# A venv keeps them apart from the base image's Python packages.
COPY requirements.lock /opt/requirements.lock
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps -r /opt/requirements.lock \
 && pip check

# An unprivileged user with a fixed UID (Kubernetes' runAsNonRoot can check a numeric USER).
RUN groupadd --system --gid 10001 clinic \
 && useradd --system --uid 10001 --gid clinic --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin clinic

# The code, owned by root and read-only for the service user. schema.sql and roles.sql ship too,
# so the image can apply the schema and roles it was built with (the compose `migrate` service).
WORKDIR /app
COPY *.py openapi.yaml schema.sql roles.sql ./

USER 10001:10001
EXPOSE 8080 8081

# /ready of whichever service this container runs: the first of APPOINTMENTS_PORT (8080) and
# BILLING_PORT (8081) that accepts a connection. It must answer 200 (database up, schema there);
# an error or a 503 raises, and python exits 1 (unhealthy). curl is not in slim images.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, socket, urllib.request as u; ports = [int(os.environ.get(k) or d) for k, d in (('APPOINTMENTS_PORT', 8080), ('BILLING_PORT', 8081))]; port = next(p for p in ports if socket.socket().connect_ex(('127.0.0.1', p)) == 0); u.urlopen(f'http://127.0.0.1:{port}/ready', timeout=3)"]

# Exec form: python is PID 1 (or tini's child with `init: true` / `docker run --init`) and gets
# SIGTERM itself; both services stop cleanly on it and exit 0.
CMD ["python", "appointments.py"]
