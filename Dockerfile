# The site's own image: every program of the stack in docker-compose.yml (the ASGI server, the Celery worker
# and beat, the gateway, Redis, the one-shot setup and firewall) runs from it.
#
# BASE_IMAGE needs Debian bookworm with `python3 -m venv`. Where no registry can be reached, make an equivalent
# one first: `./layercake site-base` (layercake/site-base:bookworm).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# Redis and what builds the curated images offline come from bookworm; xterm.js 5 and htmx 2 from trixie,
# pinned so that nothing else comes from it. iptables installs the host firewall rule (the firewall service).
RUN printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        > /etc/apt/sources.list.d/layercake-trixie.sources \
    && printf 'Package: *\nPin: release n=trixie\nPin-Priority: 1\n' > /etc/apt/preferences.d/layercake-trixie \
    && apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends \
        redis-server debootstrap debian-archive-keyring gpgv busybox-static iptables tini \
    && apt-get install -y -qq --no-install-recommends -t trixie libjs-xterm libjs-htmx \
    && rm -rf /var/lib/apt/lists/*
# A virtualenv, whatever the base: Debian's python3 takes no packages system-wide.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -q -r requirements.txt
COPY . .
ENV DJANGO_SETTINGS_MODULE=tutorial.settings.production \
    LAYERCAKE_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
RUN LAYERCAKE_SECRET_KEY=collectstatic python manage.py collectstatic --noinput -v 0
ENTRYPOINT ["tini", "--"]
CMD ["deploy/site.sh", "web"]
