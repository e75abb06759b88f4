"""`neti-fast serve`: an Automatic1111-compatible HTTP API and a web page over the batched engine.

Modules, one idea each:
  a1111.py     the txt2img request schema, A1111 field rules, sampler names -> engine schedulers, info
  concepts.py  the concepts a server offers (its --concepts folder, uploads, trained), loaded lazily
               under a memory budget with the project's restricted loaders
  batcher.py   the one request queue: compatible requests that arrive within --max-wait-ms are
               packed into one Engine.generate_batch of up to --max-batch images (the engine's own
               packing: any mix of prompts, concepts, truncations and seeds)
  training.py  one background training job at a time, from images uploaded on the page
  app.py       the server's state (`Server`: model, engine, store, batcher, trainer), the one
               txt2img validation, and the FastAPI app factory (error handlers, API key)
  routes_a1111.py  A1111's routes;  routes_neti.py  neti-fast's (info, uploads, training, health);
  routes_page.py   the page at /;  http.py  JSON errors, request bodies, the API key middleware
  ray_app.py   `serve --replicas N` / `serve run`: N replicas of that app on Ray Serve, routed by
               concept set (model multiplexing), sharing the state folder (the optional extra `ray`)
  cli.py       the `serve` subcommand (FastAPI / uvicorn are the optional extra `serve`)
  static/      the page served at /

Nothing here imports FastAPI at package import time, so `neti-fast --help` works without the extra.
"""
