"""Stage 7, the report: the simulated model against FP32 (per output, per tensor), weight figures,
agreement with the HTP emulator, report.json and report.html."""
