"""Stage 5, the optimizations: what changes weights or precision to recover accuracy (per-channel
weights, cross-layer equalization, bias correction, AdaRound, mixed precision)."""
