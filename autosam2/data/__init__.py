"""Data: the video data model, image/mask decoding, the polyp_gen reader and validator, synthetic videos,
the shard sample format, the streaming clip pipeline, transforms, and `sources` (shards or folders)."""
