"""Batch jobs, for `neti-fast run` and `neti-fast generate`: job files and the fixed batch plan
(`jobfile`), the one `runner` (resume, torchrun ranks, job.json), the output folder's
`manifest.jsonl` (`manifest`), and image names, PNGs and grids (`outputs`).

Imports `neti_fast.engine`, `neti_fast.options` and below (never `training`, `serve` or the CLI).
"""
