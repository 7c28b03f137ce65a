"""sdn-dist: distributed Symmetrical Distillation Networks.

    from sdn_dist import Pipeline      # captions -> PIL images from an exported model (sdn_dist/pipeline.py)
"""
__version__ = "0.1.0"


def __getattr__(name):
    # lazy: `import sdn_dist` (every Ray worker, the CLI's start-up) stays free of torch
    if name == "Pipeline":
        from sdn_dist.pipeline import Pipeline
        return Pipeline
    raise AttributeError(f"module 'sdn_dist' has no attribute {name!r}")


__all__ = ["Pipeline", "__version__"]
