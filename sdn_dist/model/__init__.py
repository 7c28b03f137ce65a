"""The model, free of Ray, DeepSpeed and Prometheus: the VGG19 matched-point plan (``plan``), the
frozen teacher (``teacher``), the mirrored student (``student``) and the two stage losses (``losses``)."""
