"""`cxr-export`: thin click commands over export/ library functions."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export a trained U-Net to ONNX / TensorRT, verified against PyTorch."""


if __name__ == "__main__":
    main()
