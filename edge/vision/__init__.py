"""One field seen: segment the white cells, locate single cells, cut and classify them with the model bundle."""
