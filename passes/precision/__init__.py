"""Mixed precision: fp16/bf16 conversion, Cast minimisation, reduced-precision validation."""
