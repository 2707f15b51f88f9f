"""Fractal: control plane for cloud app streaming."""
