"""Flower engine: a ServerApp and a ClientApp around the engine-agnostic Server and Client.

The only package of fedmml that imports ``flwr`` (the optional extra ``fedmml[flower]``).
"""
