"""Conversion of the original OptVQ checkpoints (GitHub zbr17/OptVQ) into this package's format.

- `original_config`: the original YAML / Hub `config.json` -> `OriginalModelSpec` -> `OptVQConfig`; the presets of the
  released models.
- `original_checkpoint`: reading the original files safely, checking every key and shape.
- `original_keys`: original weight names -> `OptVQModel` names.
- `original_reference`: the original network written from its formulas (the reference of `--verify`).
- `verification`: the comparisons `--verify` runs.
- `convert`: the command-line tool (`python conversion/convert_original_to_hf.py --help`, or
  `python -m optvq_hf.conversion --help`).

Nothing here is imported by the model.
"""
