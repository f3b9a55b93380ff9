"""Opening and probing DST before anything is written: its scheme, where it sits relative to SRC,
whether it can be written. Every refusal is a `BuildError` of one sentence that names DST without
the credentials a URL may carry."""
from __future__ import annotations

import os

from lmim.pipeline.format.manifest import MANIFEST_NAME
from lmim.pipeline.storage import Store, folder_obstacle, has_scheme, is_remote
from lmim.tools.shard.errors import BuildError

__all__ = ["scrub_url", "open_destination", "check_destination", "check_not_foreign"]


def scrub_url(url: str) -> str:
    """The URL without any user:password@ part (never written to logs or manifests)."""
    if has_scheme(url):
        scheme, rest = url.split("://", 1)
        host, sep, path = rest.partition("/")
        if "@" in host:
            host = host.rsplit("@", 1)[1]
        return f"{scheme}://{host}{sep}{path}"
    return url


def open_destination(dst: str, storage_options: dict | None) -> Store:
    try:
        return Store(dst, storage_options)
    except (ValueError, ImportError) as e:
        scheme = dst.split("://", 1)[0]
        raise BuildError(f"unknown or unavailable storage scheme {scheme!r} in DST {scrub_url(dst)} ({e}); "
                         f"use a local path, s3://bucket/prefix or another fsspec URL") from None


def check_destination(dest: Store, src: str) -> None:
    """Refuse a DST that is SRC or lies inside SRC (its shards would join the corpus), and a local DST
    that cannot be written. A remote DST is probed later, by the first read of what it holds (`state.claim`)."""
    if not dest.local:
        _check_remote_overlap(dest.url, src)
        return
    if not has_scheme(src):
        src_abs = os.path.realpath(src.rstrip("/") or "/")
        dst_real = os.path.realpath(dest.path)
        if src_abs == dst_real:
            raise BuildError("SRC and DST are the same folder; give DST a new folder")
        if os.path.isdir(src_abs) and dst_real.startswith(src_abs.rstrip(os.sep) + os.sep):
            raise BuildError(f"DST {dest.path} is inside SRC {src}: its shards would become part of the "
                             f"corpus; put DST outside SRC")
    check_not_foreign(dest)
    _check_local_writable(dest.path)


def _remote_location(url: str) -> tuple[str, str, str] | None:
    """(scheme, bucket or host, path without outer slashes) of a remote URL, credentials left out;
    None for a local one. s3a:// is s3:// under another name (fsspec opens both with s3fs)."""
    if not is_remote(url):
        return None
    scheme, rest = scrub_url(url).split("://", 1)
    host, _, path = rest.partition("/")
    scheme = scheme.lower()
    return ("s3" if scheme == "s3a" else scheme), host, path.strip("/")


def _check_remote_overlap(dst_url: str, src: str) -> None:
    """The remote twin of the local check: comparing names needs no request, and a build into SRC
    would list its own shards as images on the next run (a phantom class, rejects)."""
    src_loc, dst_loc = _remote_location(src), _remote_location(dst_url)
    if src_loc is None or dst_loc is None or src_loc[:2] != dst_loc[:2]:
        return
    src_path, dst_path = src_loc[2], dst_loc[2]
    if src_path == dst_path:
        raise BuildError("SRC and DST are the same folder; give DST a new folder")
    if src_path == "" or dst_path.startswith(src_path + "/"):
        raise BuildError(f"DST {scrub_url(dst_url)} is inside SRC {scrub_url(src)}: its shards would become part "
                         f"of the corpus; put DST outside SRC")


def check_not_foreign(dest: Store) -> None:
    """A DST that already holds files but neither a dataset nor a build of one is someone else's
    folder or prefix: writing shard-000000.tar, manifest.json and rejects.jsonl there could overwrite
    its files of the same names. (A local DST is checked first thing; a remote one once its first
    read has shown that the store answers, `state.claim`.)"""
    from lmim.tools.shard.state import BUILD_DIR  # state imports this module

    try:
        entries = dest.list()
    except NotADirectoryError:
        return  # refused as a file by _check_local_writable
    if entries and MANIFEST_NAME not in entries and BUILD_DIR not in entries:
        shown = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise BuildError(f"DST {scrub_url(dest.url)} already holds files that are not an lmim dataset ({shown}); "
                         "give DST a new or empty folder")


def _check_local_writable(path: str) -> None:
    # the nearest existing ancestor decides: DST itself is created only once the plan is written
    obstacle = folder_obstacle(path)
    if obstacle is None:
        return
    kind, probe = obstacle
    if kind == "file":
        raise BuildError(f"DST {path} cannot be created: {probe} is a file, not a folder")
    raise BuildError(f"DST {path} is not writable (no write permission on {probe}); choose another DST")