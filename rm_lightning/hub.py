"""The Hugging Face Hub when it cannot be reached: fail at once instead of after a minute of retries.

Without a network, huggingface_hub retries every request five times with backoff, so a hub id that is
not in the local cache (a backbone, a dataset) took 25-55 s to end in its error. Where the hub's host
name does not resolve and no proxy is set (a proxy resolves names itself, so nothing can be judged
then), no download can succeed: the libraries are put in their own offline mode before the first hub
request, so cached files load as before and anything else fails at once with the same message.
Online, nothing changes.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
DEFAULT_ENDPOINT = "https://huggingface.co"


@functools.cache
def hub_unreachable() -> bool:
    """True only when the endpoint's host name does not resolve and no proxy is configured (asked once)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).hostname
    if not host:
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


def offline_unless_reachable() -> None:
    """Call before a hub request: switches huggingface_hub, transformers and datasets to offline mode
    when the hub cannot be reached (the environment variable too, for the processes a run starts)."""
    if not hub_unreachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")  # reads the variable once, at its import
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
