"""Engine-agnostic federation: payloads, aggregation, the server loop and one client's local training."""
