"""The on-device side, in folders along the data's way: capture, vision, counting, reports, links, service; no TensorFlow."""
