"""The on-device side: capture, segment, classify, tally, report; never imports TensorFlow."""
