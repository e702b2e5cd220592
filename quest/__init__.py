"""quest: scalable QuEST knowledge distillation (quantized embedding space for transferring knowledge)."""

__version__ = "0.1.0"
