"""Fractal admin."""
