"""The shard builder's expected failures, each one sentence with the exit code `lmim shard` ends with.

The codes are the ones every lmim command uses: 2 a bad argument, source or destination, 5 an
object store that does not answer or refuses these credentials, 6 a local disk that cannot be
written (that one reaches the user as an `OSError`, through the `lmim` command's safety net).
"""
from __future__ import annotations

from lmim.pipeline.errors import store_client_network_error
from lmim.pipeline.storage import is_remote

__all__ = ["BuildError", "StoreNotAnswering", "reach_error"]


class BuildError(ValueError):
    """A problem with the arguments or the destination; the message is one sentence for the user."""

    exit_code = 2


class StoreNotAnswering(BuildError):
    """SRC or DST is on an object store that does not answer, or refuses these credentials."""

    exit_code = 5


def reach_error(what: str, url: str, err: Exception) -> BuildError:
    """The one sentence for `err`, raised while first reading `what` ("SRC" or "DST") at `url`."""
    reason = f"{type(err).__name__}: {err}"
    if isinstance(err, PermissionError) and is_remote(url):
        return StoreNotAnswering(f"{what} {url} is not readable with these credentials ({reason}); check "
                                 f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE or --storage-option")
    if isinstance(err, (ConnectionError, TimeoutError)) or store_client_network_error(err) is not None:
        return StoreNotAnswering(f"cannot reach {what} {url} ({reason}); check the endpoint (AWS_ENDPOINT_URL or "
                                 f"--storage-option client_kwargs.endpoint_url=URL) and the network, then run the same command again")
    return BuildError(f"cannot read {what} {url} ({reason})")
