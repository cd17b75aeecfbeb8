"""Datasets, transforms and loaders."""
