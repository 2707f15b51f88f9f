"""Fractal cloud."""
