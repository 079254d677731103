"""PyTorch side: sigmaReparam, attention-entropy measurement, a minimal Transformer and its training."""
