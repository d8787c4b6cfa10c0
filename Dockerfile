# The site's own image, for deployments with a registry (docker-compose.yml). On a machine without one,
# `./layercake up` runs the same programs directly.
FROM python:3.11-slim-bookworm
RUN echo 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        > /etc/apt/sources.list.d/trixie.sources \
    && printf 'Package: *\nPin: release n=trixie\nPin-Priority: 1\n' > /etc/apt/preferences.d/trixie \
    && apt-get update \
    && apt-get install -y --no-install-recommends -t trixie libjs-xterm libjs-htmx \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV DJANGO_SETTINGS_MODULE=tutorial.settings.production \
    LAYERCAKE_DATA_DIR=/data
RUN LAYERCAKE_SECRET_KEY=collectstatic python manage.py collectstatic --noinput
CMD ["uvicorn", "tutorial.asgi:application", "--host", "0.0.0.0", "--port", "8000", "--ws", "websockets-sansio"]
