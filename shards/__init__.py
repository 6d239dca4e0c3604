"""Offline sharding of polyp_gen folders into WebDataset tars (issue 2/6)."""
