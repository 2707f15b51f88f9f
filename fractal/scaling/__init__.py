"""Fractal scaling."""
