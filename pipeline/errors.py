"""Errors the pipeline raises: each names the shard (and the sample key when there is one)."""
from __future__ import annotations


class DataError(RuntimeError):
    """Base class: the dataset cannot be read as promised."""


class DatasetNotFound(DataError, FileNotFoundError):
    """No dataset (no manifest.json) at the URL; also a FileNotFoundError for callers that catch that."""


class NotADataset(DataError, ValueError):
    """Something is at the URL, but it is not an lmim dataset this version can read."""


class DatasetTooSmall(DataError, ValueError):
    """The dataset holds fewer samples than one batch per rank."""


class NoReadableSamples(DataError, ValueError):
    """A rank has nothing left to read (every shard it was given is empty or was skipped)."""


class ShardError(DataError):
    """A whole shard is unusable: missing, truncated, a bad index, a checksum mismatch, a network error."""

    def __init__(self, shard: str, message: str):
        super().__init__(f"shard {shard}: {message}")
        self.shard, self.message = shard, message

    def __reduce__(self):  # survive pickling (DataLoader workers hand errors to the main process)
        return (type(self), (self.shard, self.message))


class StoreUnreachable(ShardError):
    """The object store did not answer within the retry budget (network, outage, throttling).

    `shard` names the object being read: a shard, or the dataset's manifest.json (not called a shard)."""

    def __init__(self, shard: str, message: str):
        super().__init__(shard, message)
        if not shard.endswith(".tar"):
            self.args = (f"{shard}: {message}",)


class SampleError(DataError):
    """One sample cannot be decoded (raised when `on_error="raise"`).

    `position` is (shard id, sample index in the shard) when the loader knows it: what it records
    to leave the sample out of later plans (data.on_error=skip).
    """

    def __init__(self, shard: str, key: str, message: str, *, position: tuple[int, int] | None = None):
        super().__init__(f"sample {key!r} in shard {shard}: {message}")
        self.shard, self.key, self.message, self.position = shard, key, message, position

    def __reduce__(self):
        return (_sample_error, (type(self), self.shard, self.key, self.message, self.position))


def _sample_error(cls: type, shard: str, key: str, message: str, position: tuple[int, int] | None) -> "SampleError":
    return cls(shard, key, message, position=position)


class BatchFailed(DataError):
    """A backend could not make batch `batch` and cannot name the sample to blame (DALI reports a
    failed decode per batch, not per image): the loader re-reads the batch's samples to find it."""

    def __init__(self, batch: int, cause: BaseException):
        super().__init__(f"batch {batch}: {type(cause).__name__}: {cause}")
        self.batch, self.cause = batch, cause


# Exception classes of the object-store client stack that mean "the store did not answer" (matched by
# module and name, so that classifying needs none of these packages imported).
_NETWORK_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")
_NETWORK_WORDS = ("Connect", "Timeout", "Endpoint")


def store_client_network_error(err: BaseException) -> BaseException | None:
    """`err`, or an exception it was raised from, that is the store client failing to reach the store."""
    return _in_chain(err, _NETWORK_MODULES, _NETWORK_WORDS)


def store_client_credentials_error(err: BaseException) -> BaseException | None:
    """`err`, or an exception it was raised from, that is the store client finding no usable
    credentials (botocore's NoCredentialsError, PartialCredentialsError, ...): waiting never mends it."""
    return _in_chain(err, ("botocore", "aiobotocore"), ("Credential",))


def _in_chain(err: BaseException | None, modules: tuple[str, ...], words: tuple[str, ...]) -> BaseException | None:
    """The first exception of `err`'s cause/context chain whose class (or a base) comes from one of
    `modules` and has one of `words` in its name."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for cls in type(err).__mro__:
            if cls.__module__.split(".")[0] in modules and any(w in cls.__name__ for w in words):
                return err
        err = err.__cause__ or err.__context__
    return None
