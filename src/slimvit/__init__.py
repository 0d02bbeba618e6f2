"""slimvit: distill, prune, quantize and benchmark a Vision Transformer for CPU/edge inference."""

__version__ = "0.1.0"
