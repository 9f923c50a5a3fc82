"""`python -m serve_app.demo.vllm_sim --servers 16 --port 8200`: a simulated vLLM fleet in one
process, server i on port `--port` + i (its KV events, when configured, on the endpoint's port +
i, as vLLM offsets them per data-parallel rank). vLLM's own flags where they exist."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

from serve_app.demo.vllm_sim.profiles import PROFILES
from serve_app.demo.vllm_sim.publisher import KVEventsConfig
from serve_app.demo.vllm_sim.server import Fleet, Options, SimServer
from serve_app.routing.kv.tokens import load


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200, help="the first server's")
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--profile", default="h100-llama-3.1-8b", choices=sorted(PROFILES))
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="simulated seconds per wall second"
    )
    parser.add_argument("--served-model-name", default="sim")
    parser.add_argument("--tokenizer", type=Path, help="a HF tokenizer folder (else: simple)")
    parser.add_argument("--kv-events-config", help="vLLM's JSON (endpoint, replay_endpoint...)")
    parser.add_argument("--enable-prompt-tokens-details", action="store_true")
    parser.add_argument("--enable-scale-out", action="store_true", help="serve the /render routes")
    parser.add_argument("--default-max-tokens", type=int, default=16)
    for flag in ("block-size", "num-gpu-blocks-override", "max-num-seqs"):
        parser.add_argument(f"--{flag}", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--max-model-len", type=int)
    return parser.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    overrides = {
        "block_size": args.block_size,
        "num_gpu_blocks": args.num_gpu_blocks_override,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
    }
    profile = PROFILES[args.profile].model_copy(
        update={k: v for k, v in overrides.items() if v is not None}
    )
    events = (
        KVEventsConfig.model_validate_json(args.kv_events_config)
        if args.kv_events_config
        else KVEventsConfig()
    )
    return Options(
        model=args.served_model_name,
        profile=profile,
        prompt_tokens_details=args.enable_prompt_tokens_details,
        scale_out=args.enable_scale_out,
        default_max_tokens=args.default_max_tokens,
        kv_events=events,
    )


async def serve(args: argparse.Namespace) -> None:
    tokenizer = load(args.tokenizer)
    config = options(args)
    fleet = Fleet(args.time_scale)
    servers = [SimServer(config, tokenizer, fleet) for _ in range(args.servers)]
    for i, server in enumerate(servers):
        await server.start(args.host, args.port + i)
    fleet.start()
    print(f"vllm_sim: {args.servers} servers on {args.host}:{args.port}+", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fleet.stop()
    for server in servers:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
