"""SecAgg+ for fedmml's rounds (privacy.secure_aggregation): Flower's own protocol, driven from fedmml's loop.

Flower offers SecAgg+ to its legacy API only. ``SecAggPlusWorkflow`` runs one fit round through a legacy
``Strategy`` (``configure_fit``, then ``aggregate_fit`` with the unmasked result), and ``secaggplus_mod``
masks a legacy ``FitRes`` on the node. Here a one-round strategy hands the workflow fedmml's training
messages as ``FitIns`` (the header and blob in the FitIns config) and keeps what the workflow gives back; on
the node (fedmml.engines.flower.client_app), the mod runs for the messages that carry SecAgg+'s record, and
the train handler answers the FitIns with the client's change as the FitRes arrays
(fedmml.federation.secure says what they hold). No
cryptography is written here: keys, shares, masks and their removal are Flower's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedmml.config import PrivacyConfig
from fedmml.engines.flower.codec import CLIENT_SECONDS
from fedmml.federation.payload import Message as Payload
from fedmml.federation.secure import LEVELS, SecureRound, client_arrays

FIT_CONFIG = "fitins.config"  # where Flower's compat layer puts a FitIns' config in a message
HEADER = "fedmml-meta"
BLOB = "fedmml-blob"


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, except that a node lost before it shared its keys is not waited for in the
    unmask stage. Its masks are in no other update (the mod masks only against the neighbours whose shares
    it holds), yet flwr 1.42 counts it among the dropped nodes to unmask, finds none of its shares and halts
    the round: one node unreachable at a round's start would cost every round it is sampled in."""

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        super().setup_stage(grid, context, state)
        return self._forget_lost(state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        super().share_keys_stage(grid, context, state)
        return self._forget_lost(state)

    def _forget_lost(self, state: WorkflowState) -> bool:
        """Whether the round can go on with the nodes still active, which are all that count from now on
        (none when the stage stopped before sending: too few sampled)."""
        state.sampled_node_ids = set(state.active_node_ids)
        return bool(state.active_node_ids) and self._check_threshold(state)


class _OneRound(Strategy):
    """A legacy strategy for one SecAgg+ round: fedmml's instructions out, the workflow's result kept."""

    def __init__(self, grid: Grid, instructions: Sequence[tuple[int, Payload]]) -> None:
        self.grid = grid
        self.instructions = instructions
        self.results: list[tuple[Any, FitRes]] | None = None

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        empty = Parameters(tensors=[], tensor_type="")
        return [
            (GridClientProxy(node, self.grid, 0), FitIns(empty, {HEADER: p.header.decode(), BLOB: p.blob}))
            for node, p in self.instructions
        ]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        self.results = results
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def sum_round(
    grid: Grid,
    instructions: Sequence[tuple[int, Payload]],
    secure: SecureRound,
    p: PrivacyConfig,
    timeout: float,
) -> dict[int, dict[str, Any]]:
    """Run one SecAgg+ round: each (node, training message) of ``instructions`` goes to its node, and
    ``secure.mean`` gets the unmasked mean of the arrays that came back. Returns, by node, the header of each
    client whose masked arrays went into it (none when the protocol halted: too few clients stayed)."""
    strategy = _OneRound(grid, instructions)
    bare = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(bare, strategy=strategy)
    round_no = int(instructions[0][1].meta["round"]) if instructions else 0
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_no})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _Workflow(
        p.secagg_shares,
        p.secagg_threshold,
        max_weight=float(secure.max_weight),
        clipping_range=secure.value_range,
        quantization_range=LEVELS,
        timeout=timeout,
    )
    workflow(grid, context)
    if not strategy.results:
        return {}
    secure.mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    return {proxy.node_id: dict(fitres.metrics) for proxy, fitres in strategy.results}


def instruction(content: RecordDict) -> Payload | None:
    """The fedmml training message inside a SecAgg+ round's FitIns, or None for any other message."""
    if FIT_CONFIG not in content.config_records:
        return None
    config = content.config_records[FIT_CONFIG]
    return Payload(json.loads(str(config[HEADER])), bytes(config[BLOB]))


def reply_content(instruction: Payload, reply: Payload, client_s: float) -> RecordDict:
    """The client's reply as the FitRes the mod masks: its arrays and weight, its header in the metrics."""
    arrays, weight, header = client_arrays(reply, instruction.meta["secure"])
    metrics = {HEADER: json.dumps(header), CLIENT_SECONDS: client_s}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)
    return fitres_to_recorddict(fitres, keep_input=False)


def header_of(metrics: dict[str, Any]) -> tuple[Payload, float]:
    """A client's reply header (as the server takes replies in) and its handling time, from its metrics."""
    return Payload(json.loads(str(metrics[HEADER])), b""), float(metrics.get(CLIENT_SECONDS, 0.0))
