#!/usr/bin/env bash
# Make sure PostgreSQL, RabbitMQ and Redis answer on localhost; start them if not.
set -euo pipefail

wait_for() {  # name, seconds, command...
    local name=$1 seconds=$2
    shift 2
    for _ in $(seq "$seconds"); do
        if "$@" >/dev/null 2>&1; then echo "$name is up"; return 0; fi
        sleep 1
    done
    echo "$name did not come up in ${seconds}s" >&2
    return 1
}

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi
wait_for PostgreSQL 60 pg_isready -q -h 127.0.0.1 -p 5432

amqp_port_open() { python3 -c 'import socket; socket.create_connection(("127.0.0.1", 5672), 1).close()'; }
if ! amqp_port_open 2>/dev/null; then
    rabbitmq-server -detached || true
fi
wait_for RabbitMQ 90 amqp_port_open

# Redis: the tests of kombu's Redis transport (tests/integration/relay/test_redis_transport.py).
redis_port_open() { python3 -c 'import socket; socket.create_connection(("127.0.0.1", 6379), 1).close()'; }
if ! redis_port_open 2>/dev/null; then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
wait_for Redis 30 redis_port_open
