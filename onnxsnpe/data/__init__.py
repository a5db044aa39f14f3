"""Stage 2, the data: calibration and evaluation samples from .npy/.npz folders, images or SNPE
input lists, checked against the model's inputs."""
