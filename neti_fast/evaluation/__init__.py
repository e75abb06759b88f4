"""`neti-fast eval`: CLIP / DINO similarity of a generated folder against its prompts and the
training images, per truncation, with the Textual Inversion / NeTI protocol: what it reads
(`inputs`: manifests, images, prompts without markers), the embedding models (`models`), the
metrics (`metrics`), the outputs (`report`: eval.json, the trade-off plot, a table) and the
command (`cli`).

Imports `neti_fast.jobs` (manifests), `neti_fast.training` (image loading) and below.
"""
