"""Who the code under test tried to reach: every host this process looked up or connected to while a
test holds the `network_contacts` fixture, from Python's audit events."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


class NetworkContacts:
    """Hosts this process looked up or connected to while recording (Python's audit events
    `socket.getaddrinfo` and `socket.connect`, which every client library goes through)."""

    def __init__(self):
        self.hosts: list[str] = []
        self.recording = False

    def hook(self, event: str, args: tuple) -> None:
        if not self.recording:
            return
        if event == "socket.getaddrinfo":
            self.hosts.append(str(args[0]))
        elif event == "socket.connect" and isinstance(args[1], tuple):
            self.hosts.append(str(args[1][0]))


_CONTACTS = NetworkContacts()
sys.addaudithook(_CONTACTS.hook)  # audit hooks cannot be removed: this one records only inside the fixture


@pytest.fixture
def network_contacts() -> Iterator[NetworkContacts]:
    _CONTACTS.hosts.clear()
    _CONTACTS.recording = True
    try:
        yield _CONTACTS
    finally:
        _CONTACTS.recording = False
