"""An upstream that starts a chunked JSON answer and drops the connection half-way.

``GET /health`` answers 200, so trio-swap sees it ready.

Usage: python tests/upstreams/cut_body.py PORT
"""

from __future__ import annotations

import socket
import sys


def main() -> None:
    server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            if conn.recv(65536).startswith(b"GET /health"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                continue
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b'transfer-encoding: chunked\r\n\r\n5\r\n{"a":\r\n'
            )


if __name__ == "__main__":
    main()
