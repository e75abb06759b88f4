"""Training a concept: the `trainer` (the official NeTI / XTI / TI algorithm, data-parallel under
torchrun), its `config` (TrainConfig, the official YAML, the `train` flags), resumable
`checkpoints`, and the training images and captions (`data`).

Imports `neti_fast.engine` and below (never `jobs`, `serve` or the CLI).
"""
