"""The model: SAM2 built from its config (the one factory), Meta's checkpoints (what a file holds), the
learned prompt encoder, AutoSAM2 (clip forward, streaming), and the trained-weights format."""
