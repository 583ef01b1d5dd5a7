#!/usr/bin/env python3
"""Asks a Kafka-protocol broker for its cluster metadata and prints the brokers it lists.

Usage: kafka_metadata.py HOST:PORT

A real protocol request (Metadata v1, all topics), not just an open port: the local stack uses it to
know the broker answers, and it needs nothing beyond the Python standard library (Debian's kcat
links a librdkafka too old to talk to tansu). Exits non-zero when the broker does not answer.
"""

import socket
import struct
import sys

API_METADATA = 3
API_VERSION = 1
CLIENT_ID = b"scoresync-stack"


def request(correlation_id: int) -> bytes:
    header = struct.pack(">hhih", API_METADATA, API_VERSION, correlation_id, len(CLIENT_ID)) + CLIENT_ID
    body = struct.pack(">i", -1)  # topics: null array = all topics
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection mid-response")
        data += chunk
    return data


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self):
        n = self.take(">h")
        if n < 0:
            return None
        s = self.data[self.pos : self.pos + n].decode()
        self.pos += n
        return s


def brokers(address: str):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request(correlation_id=1))
        (size,) = struct.unpack(">i", read_exact(sock, 4))
        r = Reader(read_exact(sock, size))
        if r.take(">i") != 1:
            raise ValueError("response correlation id does not match the request")
        result = []
        for _ in range(r.take(">i")):
            node_id = r.take(">i")
            broker_host = r.string()
            broker_port = r.take(">i")
            r.string()  # rack
            result.append((node_id, broker_host, broker_port))
        return result


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        found = brokers(sys.argv[1])
    except (OSError, ValueError, struct.error) as err:
        print(f"kafka metadata request to {sys.argv[1]} failed: {err}", file=sys.stderr)
        return 1
    for node_id, host, port in found:
        print(f"broker {node_id} {host}:{port}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
