"""Data: the video data model, image/mask decoding, the polyp_gen reader and validator, synthetic videos,
the shard sample format, the global order, the streaming clip pipeline, transforms, `sources` (shards or
folders) and `batches` (what the training loop draws from, and where a resumed run goes on)."""
