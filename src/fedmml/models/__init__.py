"""Models: staged encoders, their backends, projection heads and the multimodal dual encoder."""
