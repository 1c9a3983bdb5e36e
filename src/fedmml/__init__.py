"""fedmml: resource-efficient federated multimodal learning (FedMML, LW-FedMML, Prog-FedMML)."""

__version__ = "0.1.0"
