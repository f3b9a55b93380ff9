"""The on-disk dataset format: the one contract between the shard builder (`lmim.tools.shard`,
the writer) and the pipeline (`lmim.pipeline`, the reader); both import it from here.

A dataset is a folder or object-store prefix holding `manifest.json` and shards
`{prefix}-{n:06d}.tar`, each with a DALI index `{prefix}-{n:06d}.idx` beside it. A sample is
`{key}.{ext}` (the encoded image: jpg, png or webp), optional `{key}.cls` (class index as
decimal text) and `{key}.json` (source path, width, height). Keys are unique and hold no dot.
The manifest is written last, so a dataset with a manifest is complete.

- `manifest`: `manifest.json` (the shard list, classes, build record) and reading it;
- `index`: the `.idx` lines (written by the builder and the loader, parsed by the loader,
  re-derived from the tar by `lmim verify`);
- `keys`: sample keys, member names, and how a member name splits into key and extension;
- `checksum`: shard checksums (`"algorithm:hexdigest"`) and the one integrity check.

A sub-package, not one module: each part has its own readers (the checkpoint code uses only
`checksum`, DALI's index writer only `index`), and none of them needs torch.
"""
