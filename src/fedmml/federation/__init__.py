"""Engine-agnostic federation: payloads, aggregation, the server loop and one client's local training."""


class SetupFailed(RuntimeError):
    """Too few clients could be set up (e.g. their data folders are missing) for the run to start."""
