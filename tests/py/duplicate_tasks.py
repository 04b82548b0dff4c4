"""Publishes every task waiting in a Nightshift task queue twice, as a broker would after a
lost ack: takes each message (basic_get), republishes two copies with the same headers and
acks the original. Prints how many tasks it duplicated.

Usage: duplicate_tasks.py AMQP_URL TASKS_QUEUE EXPECTED_TASKS TIMEOUT_SECONDS
"""

import sys
import time

import pika


def main():
    url, queue, expected, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    taken = []
    deadline = time.time() + timeout
    while len(taken) < expected and time.time() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            time.sleep(0.05)
            continue
        taken.append((method, properties, body))
    for method, properties, body in taken:
        for _ in range(2):
            channel.basic_publish("", queue, body, properties)
        channel.basic_ack(method.delivery_tag)
    connection.close()
    print(len(taken))


if __name__ == "__main__":
    main()
