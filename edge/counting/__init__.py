"""Counting: which cells of a frame are new (count once across a scan), and the tally of a specimen."""
