"""The input kinds: class-folder tree, flat folder, file list, tar archive (local or any fsspec URL).

`open_corpus(src)` lists a corpus once, in sorted order, without reading any image; the result
(`Corpus`) is all the planner needs (ids, sizes, labels) and all a worker needs to read one item
(`read_item`). Listing failures that concern one file (a dangling symlink, a missing file named
in a list) become rejects, not errors; problems with SRC itself raise `SourceError`.
"""
from __future__ import annotations

import gzip
import bz2
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from lmim.pipeline.storage import Store, filesystem, has_scheme, is_remote, local_path
from lmim.tools.shard.errors import reach_error

if TYPE_CHECKING:  # pragma: no cover
    from fsspec import AbstractFileSystem

# Extensions that mark a folder's top level as holding images (used only to tell a flat folder
# from a class-folder tree); every non-hidden file is still a candidate and checked on its bytes.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                  ".ppm", ".pgm", ".pbm", ".pnm"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
LABEL_MODES = ("auto", "folders", "none")


class SourceError(ValueError):
    """SRC itself is unusable; the message is one sentence for the user."""


@dataclass(frozen=True, slots=True)  # slots: a million items stay a few hundred MB
class SourceItem:
    id: str                 # path relative to the corpus root (or as written in a list / tar)
    url: str                # where to read it (local path or fsspec URL); for tar members, the tar
    size: int               # bytes (-1 when unknown)
    label: int | None = None
    offset: int = -1        # tar members: byte offset of the data in `url`


@dataclass
class Corpus:
    kind: str               # "class-folders" | "folder" | "file-list" | "tar"
    root: str
    items: list[SourceItem]
    classes: list[str] | None
    rejects: list[dict] = field(default_factory=list)   # listing-time rejects: {"source", "reason"}
    local: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    cleanup: list[str] = field(default_factory=list)    # temporary files to delete after the build

    def close(self) -> None:
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self.cleanup.clear()


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_local(root: str) -> tuple[list[tuple[str, str, int]], list[dict]]:
    """(id, path, size) of every non-hidden file under root, following symlinks but no loops."""
    out: list[tuple[str, str, int]] = []
    rejects: list[dict] = []
    seen_dirs: set[tuple[int, int]] = set()

    def walk(path: str, rel: str) -> None:
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:  # a symlink loop or a second link to a folder already listed
            return
        seen_dirs.add(ident)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            rejects.append({"source": rel or ".", "reason": f"unreadable folder ({e.strerror})"})
            return
        for entry in entries:
            if _hidden(entry.name):
                continue
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    walk(entry.path, child_rel)
                elif entry.is_file(follow_symlinks=True):
                    out.append((child_rel, entry.path, entry.stat(follow_symlinks=True).st_size))
                elif entry.is_symlink():
                    rejects.append({"source": child_rel, "reason": "unreadable (dangling symbolic link)"})
            except OSError as e:
                rejects.append({"source": child_rel, "reason": f"unreadable ({e.strerror or e})"})

    walk(root, "")
    return out, rejects


def _label_items(files: list[tuple[str, str, int, int]], labels: str, kind_hint: str
                 ) -> tuple[str, list[SourceItem], list[str] | None, list[dict]]:
    """Decide flat vs class folders from the relative ids, and make the items.

    `files` holds (id, url, size, offset). A tree is class folders when every candidate image sits
    in a sub-folder (no image file at the top level), or when labels="folders".
    """
    top_images = any("/" not in f[0] and os.path.splitext(f[0])[1].lower() in IMAGE_SUFFIXES for f in files)
    has_dirs = any("/" in f[0] for f in files)
    use_folders = labels == "folders" or (labels == "auto" and has_dirs and not top_images)
    if not use_folders:
        return kind_hint, [SourceItem(i, u, s, None, o) for i, u, s, o in files], None, []
    classes = sorted({f[0].split("/", 1)[0] for f in files if "/" in f[0]})
    index = {c: n for n, c in enumerate(classes)}
    items, rejects = [], []
    for i, u, s, o in files:
        if "/" in i:
            items.append(SourceItem(i, u, s, index[i.split("/", 1)[0]], o))
        else:
            rejects.append({"source": i, "reason": "not inside a class folder"})
    return "class-folders" if kind_hint == "folder" else kind_hint, items, classes, rejects


def _list_folder(src: str, labels: str, store: Store) -> Corpus:
    if store.local:
        root = os.path.abspath(local_path(src))
        listed, rejects = _walk_local(root)
        files = [(i, p, s, -1) for i, p, s in listed]
    else:
        root = src.rstrip("/")
        rejects = []
        files = [(rel, store.url_of(rel), size, -1) for rel, size in store.find()
                 if not any(_hidden(part) for part in rel.split("/"))]
    kind, items, classes, more = _label_items(files, labels, "folder")
    return Corpus(kind, root, items, classes, rejects + more, store.local)


def _parse_list(text: str, list_url: str, local: bool) -> tuple[list[tuple[str, str, str | None]], list[dict]]:
    """(id, url, label-or-None) per line of a file list; blank lines and `#` comments are skipped.

    A line is `path`, `path<TAB>label`, or `path label` when its last blank-separated word looks
    like a label (no `/` and no `.`) and the whole line is not itself an existing file.
    """
    base = os.path.dirname(local_path(list_url)) if local else list_url.rsplit("/", 1)[0]
    rows, rejects = [], []
    for line in text.splitlines():
        line = line.strip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, label = line.strip(), None
        if "\t" in line:
            path, label = (p.strip() for p in line.rsplit("\t", 1))
        else:
            words = line.strip().rsplit(None, 1)
            if len(words) == 2 and "/" not in words[1] and "." not in words[1]:
                whole = line.strip()
                whole_url = whole if (has_scheme(whole) or os.path.isabs(whole)) else f"{base}/{whole}"
                if not (local and os.path.isfile(whole_url)):
                    path, label = words
        url = path if (has_scheme(path) or (local and os.path.isabs(path))) else f"{base}/{path}"
        rows.append((path, local_path(url), label or None))
    return rows, rejects


def _list_file_list(src: str, text: str, labels: str, local: bool) -> Corpus:
    rows, rejects = _parse_list(text, src, local)
    given = [r[2] for r in rows if r[2] is not None]
    if given and len(given) != len(rows):
        missing = next(r[0] for r in rows if r[2] is None)
        raise SourceError(f"the file list {src} gives labels for some lines but not for {missing!r}; "
                          f"give every line a label or none")
    classes = None
    label_of: dict[str, int] = {}
    if given and labels != "none":
        if all(g.lstrip("-").isdigit() for g in given):
            values = sorted({int(g) for g in given})
            if values[0] < 0:
                raise SourceError(f"the file list {src} has a negative class index ({values[0]})")
            classes = [str(v) for v in range(values[-1] + 1)]
            label_of = {g: int(g) for g in given}
        else:
            classes = sorted(set(given))
            label_of = {c: n for n, c in enumerate(classes)}
    items, seen = [], set()
    for path, url, label in rows:
        if path in seen:
            rejects.append({"source": path, "reason": "listed twice (kept the first)"})
            continue
        seen.add(path)
        size = -1
        try:
            if is_remote(url):
                size = -1  # sized lazily by the reader; remote stat per file would be one request each
            else:
                st = os.stat(url)
                if not stat.S_ISREG(st.st_mode):
                    rejects.append({"source": path, "reason": "not a regular file"})
                    continue
                size = st.st_size
        except OSError as e:
            rejects.append({"source": path, "reason": f"unreadable ({e.strerror or e})"})
            continue
        items.append(SourceItem(path, url, size, label_of.get(label) if label is not None else None))
    items.sort(key=lambda it: it.id)
    return Corpus("file-list", src, items, classes, rejects, local)


def _open_tar_file(src: str, store: Store, tmpdir_holder: list[str]) -> tuple[str, bool]:
    """The path/URL of an uncompressed tar to read members from; compressed tars are unpacked to a temp tar."""
    lower = src.lower()
    opener = None
    if lower.endswith((".tar.gz", ".tgz")):
        opener = gzip.open
    elif lower.endswith((".tar.bz2", ".tbz2")):
        opener = bz2.open
    elif lower.endswith((".tar.xz", ".txz")):
        opener = lzma.open
    if opener is None:
        return (local_path(src), store.local)
    # Random access into a compressed stream is impossible; one sequential pass into a temporary
    # plain tar lets the workers read members by offset like any other tar.
    tmpdir = tempfile.mkdtemp(prefix="lmim-untar-")
    tmpdir_holder.append(tmpdir)
    plain = os.path.join(tmpdir, "source.tar")
    with store.open() as raw, opener(raw) as zin, open(plain, "wb") as out:
        shutil.copyfileobj(zin, out, 4 << 20)
    return plain, True


def _check_tar_end(f, offset: int) -> None:
    """After the last member tarfile read, only the archive's zero blocks may follow.

    tarfile ends its listing quietly at a header cut short after the first member (so does GNU tar),
    which would build a dataset of the archive's first part and say nothing; bytes that are not zeros
    there mean the archive was cut or damaged."""
    f.seek(offset)
    while chunk := f.read(1 << 20):
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"the archive ends in a damaged or cut-off member header at byte {offset}")


def _list_tar(src: str, labels: str, store: Store) -> Corpus:
    cleanup: list[str] = []
    try:
        url, url_local = _open_tar_file(src, store, cleanup)
        files = []
        with (open(url, "rb") if url_local else store.open()) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if not m.isreg() or any(_hidden(p) for p in name.split("/")):
                    continue
                files.append((name, url, m.size, m.offset_data))
            _check_tar_end(f, tf.offset)
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile, lzma.LZMAError) as e:
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        raise SourceError(f"cannot read the tar archive {src} ({e}); check that it is a complete tar file") from None
    files.sort(key=lambda f: f[0])
    # Archives usually wrap everything in one folder (`train/...`): labels come from the level below it.
    prefix = ""
    while files and all("/" in f[0] for f in files) and len({f[0].split("/", 1)[0] for f in files}) == 1:
        prefix += files[0][0].split("/", 1)[0] + "/"
        files = [(f[0].split("/", 1)[1], *f[1:]) for f in files]
    kind, items, classes, rejects = _label_items(files, labels, "tar")
    items = [SourceItem(prefix + it.id, it.url, it.size, it.label, it.offset) for it in items]
    for r in rejects:
        r["source"] = prefix + r["source"]
    return Corpus(kind, src, items, classes, rejects, url_local if files else store.local, cleanup=cleanup)


def open_corpus(src: str, *, labels: str = "auto", storage_options: dict[str, Any] | None = None) -> Corpus:
    """List the corpus at `src` (folder, file list or tar archive; local path or fsspec URL).

    Args:
        src: local path or URL.
        labels: "auto" (class folders when every image is in a sub-folder), "folders" or "none".
        storage_options: fsspec options for remote sources (override the AWS environment).
    """
    if labels not in LABEL_MODES:
        raise SourceError(f"--labels must be one of {', '.join(LABEL_MODES)}, not {labels!r}")
    so = dict(storage_options or {})
    try:
        store = Store(src, so)
    except (ValueError, ImportError) as e:
        raise SourceError(f"unknown or unavailable storage scheme in SRC {src} ({e}); "
                          f"use a local path, s3://bucket/prefix or another fsspec URL") from None
    try:
        if not store.exists():
            raise SourceError(f"SRC {src} does not exist; give a folder of images, a file list or a tar archive")
        is_dir = store.is_dir()
    except SourceError:
        raise
    except Exception as e:  # a remote store that does not answer (network, credentials, ...)
        raise reach_error("SRC", src, e) from None
    if is_dir:
        corpus = _list_folder(src, labels, store)
    elif src.lower().endswith(TAR_SUFFIXES) or _looks_like_tar(store):
        corpus = _list_tar(src, labels, store)
    else:
        raw = store.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"SRC {src} is a file but neither a tar archive nor a UTF-8 file list "
                              f"(one image path per line, optional label)") from None
        corpus = _list_file_list(src, text, labels, store.local)
    corpus.storage_options = so
    return corpus


def _looks_like_tar(store: Store) -> bool:
    try:
        with store.open() as f:
            head = f.read(512)
        return len(head) == 512 and head[257:262] == b"ustar"
    except OSError:
        return False


def read_item(item: SourceItem, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of one item (raises OSError and friends when unreadable)."""
    return _read(item, filesystem(item.url, storage_options)[0] if is_remote(item.url) else None)


def _read(item: SourceItem, fs: AbstractFileSystem | None) -> bytes:
    """read_item with the file system of a remote item already open (None for a local one)."""
    if fs is None:
        fd = os.open(item.url, os.O_RDONLY)
        try:
            if item.offset >= 0:
                return os.pread(fd, item.size, item.offset)
            # the listed size saves a stat and sizes the buffer; reading on to EOF still gets
            # files that changed since the listing (and short reads on network file systems)
            chunks = [os.read(fd, item.size + 1 if item.size >= 0 else 1 << 20)]
            while chunks[-1]:
                chunks.append(os.read(fd, 1 << 20))
            return chunks[0] if len(chunks) == 2 else b"".join(chunks)
        finally:
            os.close(fd)
    path = fs._strip_protocol(item.url)
    if item.offset >= 0:
        return fs.cat_file(path, start=item.offset, end=item.offset + item.size)
    return fs.cat_file(path)


def iter_items(items: list[SourceItem], storage_options: dict[str, Any] | None = None,
               batch: int = 64) -> Iterator[tuple[SourceItem, bytes | Exception]]:
    """(item, bytes or the exception that reading it raised), in order.

    Remote items are fetched `batch` at a time with fsspec's concurrent `cat` (one GET each, many
    in flight), so an object-store source is not read at one round trip per image. They share
    one file system (one corpus, one scheme and one set of options).
    """
    fs = None
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        remote = [it for it in chunk if is_remote(it.url)]
        fetched: dict[int, bytes | Exception] = {}
        if remote:
            if fs is None:
                fs = filesystem(remote[0].url, storage_options)[0]
            whole = [it for it in remote if it.offset < 0]
            ranged = [it for it in remote if it.offset >= 0]
            try:
                if whole:
                    paths = [fs._strip_protocol(it.url) for it in whole]
                    got = fs.cat(paths, on_error="return")
                    if not isinstance(got, dict):  # a single path comes back as bytes
                        got = {paths[0]: got}
                    for it, p in zip(whole, paths):
                        fetched[id(it)] = got.get(p, FileNotFoundError(p))
                if ranged:
                    got = fs.cat_ranges([fs._strip_protocol(it.url) for it in ranged],
                                        [it.offset for it in ranged], [it.offset + it.size for it in ranged],
                                        on_error="return")
                    for it, data in zip(ranged, got):
                        fetched[id(it)] = data
            except Exception:  # the batch call itself failed: read one by one below
                fetched = {}
        for it in chunk:
            if id(it) in fetched:
                yield it, fetched[id(it)]
                continue
            try:
                yield it, _read(it, fs if is_remote(it.url) else None)
            except Exception as e:
                yield it, e
