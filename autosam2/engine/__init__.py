"""Training machinery: distributed set-up, engines (DDP | DeepSpeed), checkpoints, the loop."""
