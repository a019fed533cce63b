"""Is the Hugging Face hub reachable? Asked once, quickly, before anything waits on it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

import datasets.config as datasets_config
import huggingface_hub.constants as hub_constants

TRUE_VALUES = {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def hub_unreachable_reason() -> str | None:
    """None when the hub answers a TCP connect within a few seconds, else why not.

    huggingface_hub retries an unreachable host for about a minute per file; a user on an offline
    machine should hear that at once.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE_VALUES:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=5):
            return None
    except OSError as error:
        return f"{endpoint.hostname}: {error.strerror or type(error).__name__}"


@contextlib.contextmanager
def quieted(name: str):
    """Within the block, logger `name` says nothing below ERROR: the caller reports one line of its own
    (huggingface_hub warns at every retry, lm-eval at every step)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def offline_when_unreachable():
    """Within the block, the HF libraries run in offline mode if the hub does not answer.

    Cached models and datasets then load at once; uncached ones fail at once (the caller names them).
    """
    reason = hub_unreachable_reason()
    targets = [hub_constants, datasets_config]
    saved = [t.HF_HUB_OFFLINE for t in targets]
    if reason:
        for target in targets:
            target.HF_HUB_OFFLINE = True
    try:
        with quieted("huggingface_hub"):
            yield reason
    finally:
        for target, value in zip(targets, saved):
            target.HF_HUB_OFFLINE = value
