"""Datasets, preprocessing and client partitioning; independent of models and federation."""


class DataError(ValueError):
    """A dataset that cannot be used as given (unparseable, nothing usable left); the message says why."""
