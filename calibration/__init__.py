"""Calibration: flat field, white balance, pixel size, focus and colour profiles."""
