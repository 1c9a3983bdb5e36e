"""The embedded default engine: every client runs in this process, one after another. No servers, no Ray."""

from __future__ import annotations

from fedmml.federation.client import Client
from fedmml.federation.payload import Message
from fedmml.federation.server import Listener


class InProcessEngine:
    """Delivers messages by calling each client directly; payloads still travel as serialised bytes."""

    def __init__(self, clients: list[Client], listener: Listener | None = None) -> None:
        self.clients = clients
        self.listener = listener or (lambda kind, info: None)

    def dispatch(self, outgoing: list[tuple[int, Message]]) -> list[tuple[int, Message]]:
        """Run each addressed client's local training and collect the replies."""
        replies = []
        for i, (cid, message) in enumerate(outgoing):
            self.listener("client", {"client": cid, "position": i + 1, "of": len(outgoing)})
            replies.append((cid, self.clients[cid].handle(message)))
        return replies
