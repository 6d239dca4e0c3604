"""Training machinery: distributed set-up, engines (DDP | DeepSpeed), checkpoints and the loop state, stop
signals, what a resumed run changes, the run lock, the input checks, validation during training, and the
loop."""
