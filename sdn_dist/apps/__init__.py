"""The applications built on the library (``sdn_dist`` minus ``apps``): teacher pretraining
(``teacher``), the synthetic benchmark (``synth``: its data, the demo), the benchmark (``bench``)
and the model table. The library never imports them (tests/test_layout.py)."""
