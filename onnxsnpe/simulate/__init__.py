"""Stage 6, the simulation: the deploy model with SNPE's fake quantization (exact, or in the HTP's
measured integer arithmetic), the QDQ model, and the runner of Qualcomm's HTP emulator."""
