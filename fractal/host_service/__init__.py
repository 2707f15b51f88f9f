"""Fractal host service."""
