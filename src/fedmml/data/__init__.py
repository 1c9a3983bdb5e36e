"""Datasets, preprocessing and client partitioning; independent of models and federation."""
