"""Offline sharding of polyp_gen folders into WebDataset tars."""
