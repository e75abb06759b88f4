"""Concepts: the `Concept` object (`concept`: a NeTI mapper, XTI per-layer embeddings or one TI
embedding), the NeTI `mapper`, every file format users have and its loader (`importers`:
`load_concept`), precomputed per-(timestep, layer) tables and bundles (`table`, with the `TableLike`
protocol the engine reads), and concepts mixed over layers or time (`mixing`).

Imports `neti_fast.sd` (layer count, text width) and the leaves below it, nothing above.
"""
