"""cxr-ddpm training: data, model construction, DeepSpeed training, checkpoints."""
