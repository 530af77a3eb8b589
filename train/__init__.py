"""Desktop training: datasets, grouped splits, transfer learning, evaluation."""
