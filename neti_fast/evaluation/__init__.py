"""`neti-fast eval`: CLIP / DINO similarity of a generated folder against its prompts and the
training images, per truncation, with the Textual Inversion / NeTI protocol (`evaluate`).

Imports `neti_fast.jobs` (manifests), `neti_fast.training` (image loading) and below.
"""
