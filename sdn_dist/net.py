"""Local networking helpers shared by the trainer's driver, the teacher's peers and the benchmark."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the embedded Ray's API server; data-parallel peers' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
