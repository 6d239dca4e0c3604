"""Evaluation as a library: streaming inference over whole sequences, their metrics, and the report."""
