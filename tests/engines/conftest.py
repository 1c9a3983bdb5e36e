"""Fixtures for the Flower engine: an in-process grid that drives the real ServerApp and ClientApp."""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Iterable

import pytest

flwr = pytest.importorskip("flwr", reason="the Flower engine needs the optional extra fedmml[flower]")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402


class LocalGrid:
    """A grid whose nodes are ClientApp calls in this process, each with its own persistent Context.

    Node ids are scattered and in reverse partition order, so the server must map partitions to nodes.
    Every grid is a new Flower run (its own run id), as a real resumed or repeated run would be.
    Relies on two flwr internals (pinned to >=1.41,<1.43): the task identity that ``Message`` reads and the
    message id that the SuperLink would assign.
    """

    run_ids = itertools.count(1)

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        run_id = next(self.run_ids)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        self.client_app = client_app
        self.contexts = {
            9000 - 7 * pid: Context(
                run_id=run_id,
                node_id=9000 - 7 * pid,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for pid in range(num_nodes)
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        """Every node is always connected."""
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver each message to its node's ClientApp and collect the replies."""
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            # A copy, as a real transport delivers: SecAgg+'s workflow sends one content object to every node
            # and its mod pops from what it receives.
            replies.append(self.client_app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id]))
        return replies


@pytest.fixture
def local_grid() -> type[LocalGrid]:
    """The in-process grid class."""
    return LocalGrid
