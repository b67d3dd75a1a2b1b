"""gradwire: data-parallel PyTorch training on slow networks with gradient compression."""

__version__ = "0.1.0"
