"""A hub model's config.json, for the preflight of a model given only by its hub id.

`fetch_config(repo_id)` gives the path of its config.json: from the local Hugging Face cache when it
is there (also offline), else downloaded with huggingface_hub when the hub answers within a few seconds
(a login node with internet); otherwise None and why, so that the preflight can say which sizes to give instead. Never waits on retries: a
compute node or laptop without a route to the hub gets its answer in about `timeout_s`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"


class NotOnHub(LookupError):
    """The hub answered, and has no such model (or it is private and this machine has no token for it)."""


def fetch_config(repo_id: str, timeout_s: float = 3.0) -> Tuple[Optional[Path], str]:
    """(path of config.json, where it came from) or (None, why it could not be had); raises NotOnHub
    when the hub says the repository does not exist: the job would fail at its start, after the queue."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None, "huggingface_hub is not installed"
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached), f"config.json of {repo_id} in the local hub cache"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None, "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if not _reachable(endpoint, timeout_s):
        return None, f"{urlparse(endpoint).hostname} is not reachable from here"
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        path = hf_hub_download(repo_id, "config.json", etag_timeout=timeout_s, endpoint=endpoint)
    except RepositoryNotFoundError as e:
        if isinstance(e, GatedRepoError):  # it exists; the job's token may open it
            return None, f"{repo_id} is gated and this machine's token does not open it"
        raise NotOnHub(
            f"model.name_or_path: the hub ({urlparse(endpoint).hostname}) has no model '{repo_id}' (or it is "
            "private and this machine has no token for it): check the id, or give a local model directory"
        ) from None
    except Exception as e:  # noqa: BLE001 - no config.json, a revision, the network: all mean "no sizes"
        return None, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return Path(path), f"config.json of {repo_id} from the hub"


def _reachable(endpoint: str, timeout_s: float) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy, when one is set) opens in time."""
    url = urlparse(endpoint)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and url.scheme == "https":
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout_s).close()
        return True
    except OSError:
        return False
