"""Engines deliver the server's messages to clients and bring back their replies."""
