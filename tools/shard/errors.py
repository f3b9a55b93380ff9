"""The shard builder's expected failures, each one sentence with the exit code `lmim shard` ends with.

The codes are the ones every lmim command uses: 2 a bad argument, source or destination, 5 an
object store that does not answer or refuses these credentials, 6 a local disk that cannot be
written (that one reaches the user as an `OSError`, through the `lmim` command's safety net).
"""
from __future__ import annotations

import os
import re

from lmim.pipeline.errors import store_client_credentials_error, store_client_network_error
from lmim.pipeline.storage import folder_obstacle, is_remote

__all__ = ["BuildError", "StoreNotAnswering", "reach_error", "rejected_option"]


class BuildError(ValueError):
    """A problem with the arguments or the destination; the message is one sentence for the user."""

    exit_code = 2


class StoreNotAnswering(BuildError):
    """SRC or DST is on an object store that does not answer, or refuses these credentials."""

    exit_code = 5


# s3fs hands the options it does not know to its client's session, which refuses them only at the
# first request, as a TypeError naming the keyword: the user's own option, so bad input.
_REJECTED_KEYWORD = re.compile(r"unexpected keyword argument '([^']+)'")


def rejected_option(url: str, err: BaseException) -> BuildError | None:
    """The one sentence (exit 2) when `err` is the store's client refusing a storage option; else None."""
    found = _REJECTED_KEYWORD.search(str(err)) if isinstance(err, TypeError) else None
    if found is None:
        return None
    scheme = url.split("://", 1)[0] if "://" in url else "local"
    return BuildError(f"storage option {found.group(1)!r} is not one the {scheme}:// client accepts; correct or "
                      f"remove it (--storage-option / --storage-options)")


def reach_error(what: str, url: str, err: Exception) -> BuildError:
    """The one sentence for `err`, raised while first reading `what` ("SRC" or "DST") at `url`."""
    rejected = rejected_option(url, err)
    if rejected is not None:
        return rejected
    reason = f"{type(err).__name__}: {err}"
    if (isinstance(err, PermissionError) and is_remote(url)) or store_client_credentials_error(err) is not None:
        return StoreNotAnswering(f"{what} {url} is not readable with these credentials ({reason}); check "
                                 f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE or --storage-option")
    if isinstance(err, (ConnectionError, TimeoutError)) or store_client_network_error(err) is not None:
        return StoreNotAnswering(f"cannot reach {what} {url} ({reason}); check the endpoint (AWS_ENDPOINT_URL or "
                                 f"--storage-option client_kwargs.endpoint_url=URL) and the network, then run the same command again")
    if isinstance(err, NotADirectoryError) and not is_remote(url):
        # a local path that is a file, or runs through one: say so rather than the errno of a path inside it
        obstacle = folder_obstacle(url)
        if obstacle is not None and obstacle[0] == "file":
            where = "is a file" if obstacle[1] == os.path.abspath(url) else f"runs through {obstacle[1]}, which is a file"
            return BuildError(f"{what} {url} {where}, not a folder: pass the dataset's folder")
    return BuildError(f"cannot read {what} {url} ({reason})")
