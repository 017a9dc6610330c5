"""The artifact contract: what every artifact (ONNX model, TensorRT engine, `.safetensors`
checkpoint) carries and how a runtime reads it (docs/artifact-contract.schema.json).

config: the model and diffusion sections; metadata: the JSON document, its versions and
checks; artifact: `open_artifact(path) -> Artifact`, every fact sampling needs; interface:
the denoiser's I/O; engine_file: the TensorRT engine header; describe: what
`cxr-runtime inspect` prints.
"""
