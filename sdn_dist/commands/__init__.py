"""The ``sdn-dist`` commands: the CLI (``cli``), the demo pipeline, teacher training, the model
table and the benchmark."""
