"""Evaluation metrics on plain tensors: image-text retrieval recall and zero-shot classification."""
