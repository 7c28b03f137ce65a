"""``sdn-dist bench`` (``bench``) and its plain-PyTorch / DDP / DeepSpeed peers (``peer``)."""
