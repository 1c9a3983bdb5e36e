"""The ClientApp: each message goes to what the node does for it (fedmml.engines.flower.node).

In a deployment Flower starts a process per message, and three of SecAgg+'s four stages per round
(privacy.secure_aggregation) are answered by its mod alone: this module imports only Flower, and the node's
work (torch, the model, the data) is imported by the messages that need it, so those stages start in a
tenth of the time.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

app = ClientApp()


def secure_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+'s mod for the messages of its protocol; every other message passes as it came."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.query()
def setup(msg: Message, context: Context) -> Message:
    """Keep the run config the server sent, open this node's own data, and answer with its partition and its
    data description, or the one line that says why the data cannot be used."""
    from fedmml.engines.flower import node

    return node.setup(msg, context)


@app.train(mods=[secure_mod])
def train(msg: Message, context: Context) -> Message:
    """One round of local training by this node's client (under privacy.secure_aggregation, each of the
    SecAgg+ stages: the mod answers all but the one that trains)."""
    from fedmml.engines.flower import node

    return node.handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: this node scores the global model on its own held-out split."""
    from fedmml.engines.flower import node

    return node.handle(msg, context)
