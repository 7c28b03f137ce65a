"""Evaluation: the quality report (``report``), the independent attribute judge (``judge``), and
generation from an exported student (``generate``)."""
