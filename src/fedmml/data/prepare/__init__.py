"""Builders that download and convert public datasets into the COCO captions layout."""

from fedmml.data.prepare.emoji import prepare_emoji
from fedmml.data.prepare.output import PrepareError

__all__ = ["PrepareError", "prepare_emoji"]
