"""Evaluating generated images: Frechet distances (FID, FD-DINOv2) and their detectors."""
