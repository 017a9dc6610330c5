"""`cxr-runtime`: thin click commands over runtime/ library functions (never imports torch)."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Sample chest radiographs from exported ONNX / TensorRT engines."""


if __name__ == "__main__":
    main()
