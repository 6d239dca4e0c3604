"""The model: SAM2 built from its config, the learned prompt encoder, and AutoSAM2 (clip forward, streaming)."""
