"""`python -m rlsr_ray.serve CHECKPOINT [options]`: a trained policy behind an OpenAI-compatible API.

A Ray Serve deployment with a FastAPI ingress serves `POST /v1/chat/completions` and
`GET /v1/models` on 127.0.0.1 unless --host says otherwise (Serve's HTTP endpoint has no
authentication). It uses the rollout role's backends: transformers on CPU, vLLM on GPUs with
--backend vllm. Requests are checked by rlsr_ray.serving.chat_api; a bad one gets a 4xx with OpenAI's
error body and the server goes on. One replica generates one request at a time (the others
queue); --replicas adds replicas.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

# The Ray this module starts runs single-node, all on loopback (see driver.ray_session.single_node_mode):
# read when ray is first imported, hence before the import below.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from ray import serve  # noqa: E402

from rlsr_ray.serving.chat_api import (ApiError, ChatRequest, chat_response, context_error, cut_at_stop,  # noqa: E402
                               models_response, parse_chat_request)
from rlsr_ray.serving.loopback import replica_grpc_on_loopback  # noqa: E402

app = FastAPI(title="rlsr_ray policy server")


@serve.deployment(max_ongoing_requests=32, graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(app)
class PolicyServer:
    def __init__(self, checkpoint: str, name: str, backend: str, device: str, compute_dtype: str,
                 max_tokens_limit: int, torch_threads: int):
        from actors.rollout import RolloutActor

        replica_grpc_on_loopback()
        self.name, self.max_tokens_limit = name, max_tokens_limit
        self.rollout = RolloutActor(checkpoint, backend=backend, compute_dtype=compute_dtype, device=device,
                                    torch_threads=torch_threads, generate_batch_size=1)
        from transformers import AutoConfig

        # Prompt + answer must fit the positions the model has: past them an HF model fails inside
        # its forward pass, which a client would see as a 500.
        from rlsr_ray.modeling import lora

        model = lora.base_path(checkpoint) if lora.is_adapter(checkpoint) else checkpoint  # an adapter's base
        self.context = AutoConfig.from_pretrained(model).get_text_config().max_position_embeddings
        self.lock = asyncio.Lock()  # one generate at a time per replica; the rest wait their turn

    @app.get("/v1/models")
    async def models(self):
        return models_response(self.name)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        try:
            req = parse_chat_request(await request.body(), self.name, self.max_tokens_limit)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        try:
            async with self.lock:  # the forward pass blocks: off the event loop
                return await asyncio.to_thread(self._complete, req)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)

    def _complete(self, req: ChatRequest) -> dict:
        from actors.sampling import SamplingSpec
        from rlsr_ray.data import chat_prompt_ids

        tok = self.rollout.tok
        ids = chat_prompt_ids(tok, req.messages)
        if len(ids) + req.max_tokens > self.context:
            raise context_error(len(ids), req.max_tokens, self.context)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        sample = self.rollout.backend.generate([ids], SamplingSpec(1, req.max_tokens, req.temperature, req.top_p,
                                                                   seed))[0][0]
        text, stopped = cut_at_stop(tok.decode(sample.response_ids, skip_special_tokens=True), req.stop)
        # Stop strings are matched in the decoded answer (the backends stop on EOS only); what
        # follows a match is dropped and not counted.
        tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if stopped else len(sample.response_ids)
        return chat_response(self.name, text, "stop" if stopped else sample.finish_reason, len(ids), tokens)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rlsr_ray.serve", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="an HF model folder, e.g. a run's checkpoints/step_N")
    ap.add_argument("--host", default="127.0.0.1", help="listen address (default loopback: there is no auth)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--name", help="the model id clients send (default: the folder's name)")
    ap.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    ap.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="per replica")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="per replica")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from rlsr_ray.modeling import lora

    adapter = lora.is_adapter(args.checkpoint)
    if not adapter and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        print(f"rlsr_ray.serve: error: {args.checkpoint}: neither an HF model folder (no config.json) nor a PEFT "
              f"adapter folder (no adapter_config.json)", file=sys.stderr)
        return 2
    if adapter and args.backend == "vllm":
        print(f"rlsr_ray.serve: error: {args.checkpoint}: the vllm backend serves a whole model: pass the merged "
              f"folder ({os.path.join(args.checkpoint, lora.MERGED)} for a run's final checkpoint)", file=sys.stderr)
        return 2
    import ray
    from actors.pool import WORKER_ENV

    ray.init(address="local", num_cpus=int(args.replicas * args.num_cpus) + 1, include_dashboard=False,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True)
    name = args.name or os.path.basename(os.path.normpath(args.checkpoint))
    serve.start(http_options={"host": args.host, "port": args.port})
    deployment = PolicyServer.options(num_replicas=args.replicas,
                                      ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus})
    serve.run(deployment.bind(os.path.abspath(args.checkpoint), name, args.backend, args.device, args.compute_dtype,
                              args.max_tokens_limit, max(1, int(args.num_cpus))),
              name="rlsr_policy", route_prefix="/")
    print(f"rlsr_ray.serve: {name} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
