"""Data: the video model, the polyp_gen reader and the synthetic generator."""
