"""Real radiographs in: decoding one image (imageio: JPEG/PNG/DICOM to float32) and the
class-folder dataset layout (datasets), shared by training, data checks and evaluation.
"""
