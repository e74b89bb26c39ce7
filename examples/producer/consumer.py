"""Example consumer: binds a queue to every routing key of the outbox exchange and prints.

OUTBOX_BROKER_URL=amqp://... python consumer.py
"""

from __future__ import annotations

import json
import logging

import kombu

from outbox.cli import settings

log = logging.getLogger("example.consumer")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s consumer %(message)s")
    values = settings.resolve({}, "consumer")
    exchange = kombu.Exchange(values["exchange"], type="topic", durable=True)
    queue = kombu.Queue("example-consumer", exchange=exchange, routing_key="#", durable=True)

    def handle(_decoded: object, message: kombu.Message) -> None:
        event = json.loads(message.body)
        content = event["resource"]["content"]
        log.info(
            "%s %s key=%s id=%s content=%s",
            message.delivery_info["routing_key"],
            event["action"],
            message.headers.get("outbox-key"),
            message.properties.get("message_id"),
            json.dumps(content, sort_keys=True),
        )
        message.ack()

    connection = kombu.Connection(values["broker_url"], heartbeat=30)
    with connection, connection.Consumer(queue, callbacks=[handle], accept=["json"]):
        log.info("waiting for events on exchange %r", values["exchange"])
        while True:
            try:
                connection.drain_events(timeout=5)
            except TimeoutError:
                connection.heartbeat_check()


if __name__ == "__main__":
    main()
