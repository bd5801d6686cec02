"""Judging captions: CLIP scores, candidates, quality gates, the dataset report."""
