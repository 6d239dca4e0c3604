"""Run under torchrun by tests/test_stream_distributed.py: what each rank reads, gathered on rank 0."""

import json
import sys

import torch.distributed as dist

from autosam2.config import DataConfig
from autosam2.data.stream import ClipStream, make_loader


def main(shard_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    evaluation = ClipStream(shard_dir, "eval", DataConfig(), 32, seed=0)
    sequences = [(b.video_ids[0], b.images_TBCHW.shape[0]) for b in make_loader(evaluation, num_workers=2)]
    shards = sorted(
        {s["name"] for s in evaluation.manifest["shards"] for name, _ in sequences if name in s["sequences"]}
    )
    training = ClipStream(shard_dir, "train", DataConfig(clip_len=3, batch_size=2), 32, seed=1)
    counts = []
    for epoch in range(2):
        training.set_epoch(epoch)
        counts.append(sum(1 for _ in make_loader(training, num_workers=2)))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(
        gathered, {"rank": rank, "sequences": sequences, "shards": shards, "train_batches": counts}
    )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
