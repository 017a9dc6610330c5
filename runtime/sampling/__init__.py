"""Making images with a denoiser: schedule math (schedule), timestep grids (timesteps), the
samplers (samplers), classifier-free guidance (guidance), requests and batches
(generate: resolve_request, iter_batches, generate) and `cxr-runtime bench` (bench).
"""
