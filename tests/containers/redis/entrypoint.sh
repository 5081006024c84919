#!/bin/sh
# The official image's start, in short: redis-server drops to the redis user and starts with
# protected mode off; anything else runs as given.
set -e
if [ "${1:-}" = "redis-server" ]; then
    shift
    chown -R redis:redis /data
    exec setpriv --reuid=redis --regid=redis --init-groups \
        redis-server --protected-mode no "$@"
fi
exec "$@"
