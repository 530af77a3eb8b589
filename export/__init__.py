"""Export: int8 TFLite conversion, the float-versus-int8 gate, the model bundle."""
