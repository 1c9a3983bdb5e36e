"""Builders that download and convert public datasets into the COCO captions layout."""

from fedmml.data.prepare.emoji import PrepareError, prepare_emoji

__all__ = ["PrepareError", "prepare_emoji"]
