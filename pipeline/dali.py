"""The DALI graph: encoded images -> decoded crop -> resize (bicubic) -> flip -> normalise -> NCHW.

Two sources of encoded images:
- local shards: DALI's `fn.readers.webdataset`, given per-run index files listing exactly the
  samples of the plan in plan order (an index may list a shard's samples in any order or any
  subset, so the deterministic order of `lmim.pipeline.order` needs no extra copy of the data);
- remote shards: `fn.external_source` fed from whole-shard streaming reads (`lmim.pipeline.stream`);
  so is a mixture of datasets (`data.sources`), whose plan interleaves the datasets sample by
  sample: its local shards are read in place by byte span (`lmim.pipeline.source`).
Crop windows and flips always come from Python (`fn.external_source`), computed by
`lmim.pipeline.order.crop_windows` from the sizes in each sample's `.json`, so `decoders.image_slice`
decodes only the window (less work than a full decode) and the randomness is exactly resumable.
Decoding is "mixed" (nvJPEG on the GPU) when the process has a CUDA device, "cpu" otherwise;
on the CPU the resize/flip/normalise tail runs in torch (`lmim.pipeline.resize`), which is several
times faster there than DALI's CPU resampler, one batch ahead in a background thread (local shards).

`DaliBatches` is the loader backend (`lmim.pipeline.backend`): it runs one epoch's plan through
such a pipeline.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from lmim.pipeline.backend import DecodedBatch, EpochPlan, GeneratorBackend, ImageSpec
from lmim.pipeline.errors import BatchFailed
from lmim.pipeline.order import runs
from lmim.pipeline.shards import ShardMeta, write_index
from lmim.pipeline.source import MixedSource, PlanReader, ShardSource


def build_pipeline(
    *,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    train: bool,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    source: Callable,
    files: tuple[list[str], list[str]] | None,
    prefetch: int = 2,
    resize_in_dali: bool = True,
):
    """Build (not yet run) a DALI pipeline.

    Args:
        source: batch callback for `fn.external_source(batch_info=True)`; returns
            (encoded?, anchors, shapes, flips?) in train mode and (encoded,) in eval mode, the
            encoded images only when `files` is None (streaming), the flips only when
            `resize_in_dali`.
        files: (tar paths, index paths) for `fn.readers.webdataset`, or None to stream.
        resize_in_dali: resize, flip and normalise in DALI (GPU); if False the pipeline returns
            the decoded uint8 HWC crops (train) or images (eval) and `lmim.pipeline.resize` finishes
            them (the CPU path: see that module for why).
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    decode_device = "mixed" if gpu else "cpu"
    mean255 = [255.0 * m for m in mean]
    std255 = [255.0 * s for s in std]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch)
    def graph():
        streaming = files is None
        if train:
            # The source gives (encoded if streaming) + anchors, shapes (+ flips if resize_in_dali).
            fed = fn.external_source(source=source, num_outputs=(1 if streaming else 0) + 2 + int(resize_in_dali),
                                     batch=True, batch_info=True)
            if streaming:
                encoded, fed = fed[0], fed[1:]
            else:
                encoded = fn.readers.webdataset(paths=files[0], index_paths=files[1], ext=["jpg;png;webp"],
                                                random_shuffle=False, name="reader")
            anchors, shapes = fed[0], fed[1]
            images = fn.decoders.image_slice(encoded, anchors, shapes, device=decode_device, output_type=types.RGB,
                                             axis_names="WH", normalized_anchor=False, normalized_shape=False)
            if not resize_in_dali:
                return images
            images = fn.resize(images, size=[out_size, out_size], interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(images, mirror=fed[2], mean=mean255, std=std255,
                                            dtype=types.FLOAT, output_layout="CHW")
        if streaming:
            encoded = fn.external_source(source=source, num_outputs=1, batch=True, batch_info=True)[0]
        else:
            encoded = fn.readers.webdataset(paths=files[0], index_paths=files[1], ext=["jpg;png;webp"],
                                            random_shuffle=False, name="reader")
        images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
        if not resize_in_dali:
            return images
        images = fn.resize(images, resize_shorter=int(out_size / 0.875), interp_type=types.INTERP_CUBIC,
                           antialias=True)
        return fn.crop_mirror_normalize(images, crop=[out_size, out_size], mean=mean255, std=std255,
                                        dtype=types.FLOAT, output_layout="CHW")

    pipe = graph()
    pipe.build()
    return pipe


def _one_torch_thread() -> None:
    """Make the calling thread's torch ops use one thread. torch settles a thread's count at its first
    op from the process-wide default; set before that, the count would be reset to the default."""
    import torch

    torch.get_num_threads()
    torch.set_num_threads(1)


def to_torch(output, device) -> "torch.Tensor":
    """Copy a DALI TensorList into a new torch tensor on `device` via DALI's PyTorch plugin."""
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = output.as_tensor()
    out = torch.empty(t.shape(), dtype=torch.float32, device=device)
    if out.is_cuda:
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(out.device))
    else:
        feed_ndarray(t, out)
    return out


def as_encoded(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


class DaliBatches(GeneratorBackend):
    """One epoch's plan through a DALI pipeline: `DecodedBatch`es in plan order.

    Local shards: DALI's webdataset reader reads per-run index files (written to a temporary
    folder) that list the plan's samples in plan order; the feed gives only crop windows and
    flips. Remote shards (and mixtures): the source's plan reader fetches whole shards in plan
    order (or reads local ones in place) and the feed hands DALI the encoded images as well.
    DALI prefetches, so the feed runs ahead of the batches returned; a failure in the feed comes
    back from `Pipeline.run()` and is raised as itself.
    """

    def __init__(self, plan: EpochPlan, source: ShardSource | MixedSource, spec: ImageSpec):
        self.plan, self.source, self.spec = plan, source, spec
        dev = spec.device
        if dev.type == "cuda":
            import torch

            self._device_id: int | None = dev.index if dev.index is not None else torch.cuda.current_device()
        else:
            self._device_id = None
        self._resize_in_dali = self._device_id is not None  # on the CPU, torch finishes the crops
        self._flips: dict[int, np.ndarray] = {}   # iteration -> flips, for the CPU tail
        self._seen: dict[int, ShardMeta] = {}     # streaming: metadata of the shards the feed reached
        self._last_fed: tuple | None = None       # repeated when DALI's prefetch runs past the plan
        # The feed's failure, kept because DALI may hand it back from run() wrapped (versions differ).
        self._feed_error: BaseException | None = None
        self._reader: PlanReader | None = None     # feeding encoded bytes: the plan's shards in plan order
        self._index_dir: str | None = None
        self._pipe: Any = None

    def _batches(self) -> Iterator[DecodedBatch]:
        try:
            spec = self.spec
            files = self._start()
            self._pipe = build_pipeline(batch_size=self.plan.batch_size, num_threads=spec.threads,
                                        device_id=self._device_id, train=spec.train, out_size=spec.size,
                                        mean=spec.mean, std=spec.std, source=self._feed, files=files,
                                        resize_in_dali=self._resize_in_dali)
            if self._resize_in_dali or files is None:
                for it in range(self.plan.num_batches):
                    yield self._next(it)
            else:
                yield from self._read_ahead()
        finally:
            self._release()

    def _read_ahead(self) -> Iterator[DecodedBatch]:
        """The CPU path from local shards: batch it + 1 is run and finished (torch's resize tail,
        `lmim.pipeline.resize`) in one background thread while the trainer steps on batch it.
        Run in the caller's thread, the tail was a pause of every step (about 5% of a quickstart
        step on 2 cores, the trainer waiting while one core resized); DALI's own prefetch covers
        only the decode. Local shards only: a streamed feed can wait long on the network, and a
        stop must not wait behind it. Errors are raised here, in order, as themselves."""
        import torch

        n = self.plan.num_batches
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmim-cpu-tail") as pool:
            # One torch thread there for good, set while this thread waits: torch.set_num_threads
            # also resets process-wide state (the count new threads start with, oneDNN's caches),
            # which must not change under the model's ops; the last call restores that count.
            threads = torch.get_num_threads()   # read first: it also settles this thread's own count
            try:
                pool.submit(_one_torch_thread).result()
            finally:   # also when a stop interrupts the wait
                torch.set_num_threads(threads)
            ahead = pool.submit(self._next, 0) if n else None
            for it in range(n):
                try:
                    batch = ahead.result()
                except BaseException:
                    # the error's traceback holds this frame: without the future (which holds the
                    # error) no cycle keeps DALI's failed pipeline alive until a garbage collection
                    ahead = None
                    raise
                ahead = pool.submit(self._next, it + 1) if it + 1 < n else None
                yield batch
            # closed early: leaving the block waits for the batch in flight (local reads and a
            # resize: milliseconds) before the pipeline is released

    def _next(self, it: int) -> DecodedBatch:
        """Batch `it` of the plan: DALI's run, then the CPU tail (or the GPU output as it is)."""
        return self._decoded(it, self._run(it))

    def _release(self) -> None:
        # Drop the pipeline now, in this process: it holds the feed, the feed this object, and a
        # kept error the frames of its traceback; left to the garbage collector, a forked child
        # could finalize the pipeline (see lmim.pipeline.forking).
        self._pipe = None
        self._feed_error = None
        self._last_fed = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._index_dir is not None:
            shutil.rmtree(self._index_dir, ignore_errors=True)
            self._index_dir = None

    # ------------------------------------------------------------------ set-up
    def _start(self) -> tuple[list[str], list[str]] | None:
        """Open the plan's shards to feed their bytes (remote, or a mixture of datasets), or write the
        per-run indices of DALI's reader (local) and return (tars, indices)."""
        plan, source = self.plan, self.source
        if source.feeds_bytes:
            self._reader = source.open_plan(plan.shards)
            return None
        self._index_dir = tempfile.mkdtemp(prefix="lmim-idx-")
        paths, indices = [], []
        for n, (sid, lo, hi) in enumerate(runs(plan.shards)):
            meta = source.meta(sid)
            idx_path = os.path.join(self._index_dir, f"{n:06d}.idx")
            write_index(idx_path, [meta.index_lines[int(i)] for i in plan.samples[lo:hi]])
            paths.append(os.path.abspath(source.tar_path(sid)))
            indices.append(idx_path)
        return paths, indices

    def _meta(self, sid: int) -> ShardMeta:
        if self.source.feeds_bytes:
            if sid not in self._seen:
                self._seen[sid] = self._reader.get(sid).meta
            return self._seen[sid]
        return self.source.meta(sid)

    # ------------------------------------------------------------------ DALI's side
    def _feed(self, info) -> tuple:
        """`fn.external_source` callback for iteration `info.iteration`: (encoded?, anchors, shapes, flips?)."""
        try:
            return self._feed_batch(int(info.iteration))
        except BaseException as e:
            self._feed_error = e
            raise

    def _feed_batch(self, it: int) -> tuple:
        plan, streaming = self.plan, self.source.feeds_bytes  # "streaming": fed bytes, remote or mixed
        B, npos = plan.batch_size, len(plan.shards)
        lo = it * B
        if streaming and lo >= npos:
            return self._last_fed  # DALI's prefetch runs past the end: repeated, never consumed
        # Past the end, local positions wrap (DALI's reader loops too); remote ones repeat the last.
        pos = np.arange(lo, lo + B) % npos if not streaming else np.minimum(np.arange(lo, lo + B), npos - 1)
        sids, idxs = plan.shards[pos], plan.samples[pos]
        out: list[Any] = []
        if streaming:
            datas = {}
            for s in sids:  # in plan order: the reader hands shards out sequentially
                if int(s) not in datas:
                    datas[int(s)] = self._reader.get(int(s))
                    self._seen[int(s)] = datas[int(s)].meta
            out.append([as_encoded(datas[int(s)].images[int(i)]) for s, i in zip(sids, idxs)])
        metas = [self._meta(int(s)) for s in sids]
        if self.spec.train:
            w = np.array([m.widths[int(i)] for m, i in zip(metas, idxs)])
            h = np.array([m.heights[int(i)] for m, i in zip(metas, idxs)])
            anchors, shapes, flips = plan.windows(plan.start + it, w, h)
            out += [list(anchors), list(shapes)]
            if self._resize_in_dali:
                out.append(list(flips))
            else:
                self._flips[it] = flips
        self._last_fed = tuple(out)
        return self._last_fed

    def _run(self, it: int):
        try:
            (out,) = self._pipe.run()
        except Exception as e:
            if self._feed_error is not None:
                raise self._feed_error from None
            raise BatchFailed(self.plan.start + it, e) from e
        return out

    def _decoded(self, it: int, out) -> DecodedBatch:
        from lmim.pipeline.resize import finish_batch

        plan, spec = self.plan, self.spec
        b = plan.start + it
        lo, hi = plan.span(b)
        if self._resize_in_dali:
            images = to_torch(out, spec.device)[: hi - lo]
        else:
            images = finish_batch([out.at(i) for i in range(hi - lo)], spec.size, spec.mean, spec.std,
                                  flips=self._flips.pop(it, None), eval_resize=not spec.train)
        metas = [self._meta(int(s)) for s in plan.shards[lo:hi]]
        idxs = plan.samples[lo:hi]
        return DecodedBatch(b, images, [m.keys[int(i)] for m, i in zip(metas, idxs)],
                            np.array([m.labels[int(i)] for m, i in zip(metas, idxs)], np.int64))
