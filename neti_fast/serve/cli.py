"""`neti-fast serve`: arguments and start-up (FastAPI / uvicorn come with `pip install -e ".[serve]"`)."""
from __future__ import annotations

import os

from ..errors import NetiError
from ..options import count, megabytes, number
from ..utils import Range


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP server: Automatic1111-compatible API and a web page; "
                                     "batches concurrent users' requests across their concepts")
    p.add_argument("--model", required=True, help="diffusers folder, hub id, or built-in: tiny, tiny-sd2, tiny-xl, sd15-shaped, sd2-shaped, sdxl-shaped")
    p.add_argument("--concepts", default=None, metavar="DIR",
                   help="folder of concept / table / bundle files (any supported format); each is named by its "
                        "file name without suffix, written {name} (or as a word) in prompts")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; any other needs --api-key)")
    p.add_argument("--port", type=number(Range(int, 0, 65535)), default=7860, help="0: any free port")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--max-batch", type=count(), default=16, help="images per engine batch (default 16)")
    p.add_argument("--max-wait-ms", type=number(Range(float, 0)), default=50.0,
                   help="how long a request waits for batch-mates before its batch starts (default 50)")
    p.add_argument("--api-key", default=os.environ.get("NETI_FAST_API_KEY"),
                   help="required on every route but /health (default: $NETI_FAST_API_KEY)")
    p.add_argument("--state-dir", default="neti-fast-serve",
                   help="where uploads, training runs and trained concepts go (default ./neti-fast-serve)")
    p.add_argument("--outputs", default=None, metavar="DIR",
                   help="where requests with save_images write their PNGs and manifest.jsonl (default STATE_DIR/outputs)")
    p.add_argument("--max-upload-mb", type=count(), default=256, help="largest concept upload (default 256)")
    p.add_argument("--cache-mb", type=megabytes(), default=2048, help="memory for prepared conditionings (default 2048)")
    p.add_argument("--concept-cache-mb", type=megabytes(), default=1024, help="memory for loaded concept tables (default 1024)")
    p.add_argument("--replicas", type=count(), default=None, metavar="N",
                   help="serve with N model replicas on Ray Serve (each its own GPU and batcher), requests "
                        "routed to a replica that holds their concepts; needs the `ray` extra and a --state-dir "
                        "every node shares (default: one process, no Ray)")
    p.add_argument("--train-gradient-checkpointing", action="store_true",
                   help="training runs (/neti/train) use gradient checkpointing: less memory, slower")
    p.add_argument("--autoscale", type=count(0), nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="Ray Serve autoscaling between MIN and MAX replicas (instead of --replicas)")
    p.set_defaults(func=main)


def config_from_args(args):
    from .app import ServeConfig
    from ..options import torch_setup  # one device / dtype rule for every subcommand
    device, dtype = torch_setup(args)
    return ServeConfig(model=args.model, concepts=args.concepts, host=args.host, port=args.port, device=device,
                       dtype=str(dtype).replace("torch.", ""), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                       api_key=args.api_key or None, state_dir=args.state_dir, outputs=args.outputs,
                       max_upload_mb=args.max_upload_mb,
                       cache_mb=args.cache_mb, concept_cache_mb=args.concept_cache_mb,
                       train_gradient_checkpointing=args.train_gradient_checkpointing)


def ray_config_from_args(args, cfg):
    from .ray_app import RayConfig, check_ray_config
    rc = RayConfig(replicas=args.replicas or 1, autoscale=tuple(args.autoscale) if args.autoscale else None,
                   gpus_per_replica=1.0 if cfg.device.startswith("cuda") else 0.0)
    check_ray_config(rc)
    return rc


def main(args) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise NetiError('needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    from .app import Server, check_config, create_app
    if args.replicas is not None and args.autoscale is not None:
        raise NetiError("--replicas / --autoscale: give one of them (a fixed count, or MIN MAX)")
    if args.replicas is not None or args.autoscale is not None:
        from .ray_app import ray_missing
        if (why := ray_missing()) is not None:
            raise NetiError(why)
    cfg = config_from_args(args)
    check_config(cfg)  # before the (slow) model load
    if args.replicas is not None or args.autoscale is not None:
        return _main_ray(args, cfg)
    server = Server(cfg)
    names = server.store.names()
    print(f"neti-fast serve: {cfg.model} on {cfg.device}, {len(names)} concept(s)"
          f"{' (' + ', '.join(names[:8]) + (', ...' if len(names) > 8 else '') + ')' if names else ''}; "
          f"http://{cfg.host}:{cfg.port}/")
    for name, why in server.store.skipped.items():
        print(f"  skipped {name}: {why}")
    uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level="warning")


def _main_ray(args, cfg) -> None:
    import dataclasses
    import signal
    import time

    from .ray_app import run
    if cfg.device.startswith("cuda:"):  # Ray gives each replica its own GPU, seen there as cuda
        cfg = dataclasses.replace(cfg, device="cuda")
    rc = ray_config_from_args(args, cfg)
    n = f"{rc.autoscale[0]}-{rc.autoscale[1]}" if rc.autoscale else str(rc.replicas)
    print(f"neti-fast serve: {cfg.model} on Ray Serve, {n} replica(s) on {cfg.device}; state folder "
          f"{cfg.state_dir} (shared by the replicas); http://{cfg.host}:{cfg.port}/", flush=True)
    def stop(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)  # a service manager's stop: the same clean shutdown as Ctrl-C
    run(cfg, rc, blocking=False)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import ray
        from ray import serve
        serve.shutdown()
        ray.shutdown()
