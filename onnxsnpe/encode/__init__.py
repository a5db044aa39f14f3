"""Stage 4, the encodings: SNPE's encoding math (encoding.py, the only place it lives) and the range
methods that turn statistics and weights into encodings."""
