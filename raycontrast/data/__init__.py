"""Datasets and joint image/label transforms."""
