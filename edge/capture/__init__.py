"""Capture stage: frame sources behind one interface (replay of recorded frames, OpenCV/V4L2, picamera2)."""
