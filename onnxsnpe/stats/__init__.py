"""Stage 3, the statistics: one streaming onnxruntime pass over the calibration samples that folds
every quantized tensor into min/max, histograms and AIMET's PDFs (compiled kernels, exact merges)."""
