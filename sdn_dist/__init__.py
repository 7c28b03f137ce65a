"""sdn-dist: distributed Symmetrical Distillation Networks."""
__version__ = "0.1.0"
