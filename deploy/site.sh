#!/usr/bin/env bash
# One program of the docker-compose stack (docker-compose.yml), run in the site's image.
#   deploy/site.sh web|worker|beat|gateway|redis|setup|firewall
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${LAYERCAKE_HOST:=127.0.0.1}" "${LAYERCAKE_PORT:=8000}" "${LAYERCAKE_REDIS_PORT:=6391}" "${LAYERCAKE_WORKERS:=4}"
: "${LAYERCAKE_DATA_DIR:=/data}"
# uvicorn refuses a websocket message past this size before reading it whole; the terminal's own limit on a
# frame sits below it, so an oversized frame gets its clear close code (as in `./layercake up`).
WS_MAX_BYTES=$((${LAYERCAKE_TERMINAL_MAX_FRAME_BYTES:-65536} + 1024))

web() {
    # The web container stops first when the stack stops (it depends on every other service), so it ends the
    # sandboxes while Redis, the gateway and the engine's socket are still there; with no site, nothing would
    # let a student in, nor reap them. A web that dies instead leaves them to the reaper when the stack is back.
    # --http: sockets that drop a client which acknowledges nothing for 30 s (tutorial/asgi.py).
    uvicorn tutorial.asgi:application --host "$LAYERCAKE_HOST" --port "$LAYERCAKE_PORT" \
        --http tutorial.asgi:HTTPProtocol --ws websockets-sansio --ws-max-size "$WS_MAX_BYTES" --no-access-log &
    server=$!
    trap stop_web TERM INT
    wait "$server"
}

stop_web() {
    trap - TERM INT
    python manage.py sandboxes_end || true
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" || true
    exit 0
}

case "${1:-}" in
    web) web ;;
    worker) exec celery -A tutorial worker --loglevel=INFO --concurrency="$LAYERCAKE_WORKERS" ;;
    beat) exec celery -A tutorial beat --loglevel=INFO --schedule="$LAYERCAKE_DATA_DIR/celerybeat-schedule" ;;
    gateway) exec python manage.py gateway ;;
    redis)
        exec redis-server --port "$LAYERCAKE_REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
            --dir "$LAYERCAKE_DATA_DIR"
        ;;
    setup)
        mkdir -p "$LAYERCAKE_DATA_DIR"
        python manage.py migrate --noinput -v 0
        python manage.py lessons_load
        exec python manage.py images build
        ;;
    firewall) exec ./layercake firewall ;;
    *)
        echo "usage: deploy/site.sh web|worker|beat|gateway|redis|setup|firewall" >&2
        exit 2
        ;;
esac
