"""cxr-ddpm export: ONNX export, TensorRT build and numerical verification."""
