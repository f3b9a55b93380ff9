"""The DALI graph: encoded images -> decoded crop -> resize (bicubic) -> flip -> normalise -> NCHW.

Two sources of encoded images:
- local shards: DALI's `fn.readers.webdataset`, given per-run index files listing exactly the
  samples of the plan in plan order (an index may list a shard's samples in any order or any
  subset, so the deterministic order of `lmim.pipeline.order` needs no extra copy of the data);
- remote shards: `fn.external_source` fed from whole-shard streaming reads (`lmim.pipeline.stream`).
Crop windows and flips always come from Python (`fn.external_source`), computed by
`lmim.pipeline.order.crop_windows` from the sizes in each sample's `.json`, so `decoders.image_slice`
decodes only the window (less work than a full decode) and the randomness is exactly resumable.
Decoding is "mixed" (nvJPEG on the GPU) when the process has a CUDA device, "cpu" otherwise;
on the CPU the resize/flip/normalise tail runs in torch (`lmim.pipeline.resize`), which is several
times faster there than DALI's CPU resampler.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


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
