"""Serving stage: the retrieval HTTP API over a model bundle, with a durable online event log."""

from recfb.serving.app import create_app, newest_bundle, serve
from recfb.serving.config import FoldinConfig, ServeConfig
from recfb.serving.eventlog import EventLog

__all__ = ["EventLog", "FoldinConfig", "ServeConfig", "create_app", "newest_bundle", "serve"]
