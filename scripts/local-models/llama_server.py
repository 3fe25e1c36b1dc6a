"""llama.cpp's OpenAI-compatible HTTP server, from the prebuilt PyPI wheel `xllamacpp`.

xllamacpp links llama.cpp's own server (tools/server: /health, /v1/models, /v1/chat/completions
with Jinja chat templates and tool calls, SSE streaming, continuous batching over slots) into a
Python extension and starts its HTTP listener in `Server(params)`. This script only maps the
few llama-server options we use onto its parameters and stays in the foreground until SIGTERM
or SIGINT (honcho's stop, Ctrl-C). Nothing is fetched at run time: the model is a local file.

The wheel is prebuilt for x86_64 with AVX2/FMA (no AVX-512): a 135M-parameter model does not
need more, and installing it takes seconds where compiling llama.cpp took 6-13 minutes.
"""

import argparse
import os
import signal
import sys
import threading

import xllamacpp as xlc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--alias", default=None, help="the model name clients use")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--jinja", action="store_true", help="Jinja chat templates (needed for `tools`)")
    ap.add_argument("--ctx-size", type=int, default=4096, help="context shared by the slots")
    ap.add_argument("--parallel", type=int, default=1, help="slots (concurrent requests)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verbosity", type=int, default=int(os.environ.get("LLAMA_VERBOSITY", "-1")),
                    help="llama.cpp log verbosity: -1 silent (llama-server --log-disable), 3 info")
    args = ap.parse_args()

    if not os.path.isfile(args.model):
        sys.exit(f"llama_server: no model file {args.model}")

    p = xlc.CommonParams()
    p.model.path = args.model
    if args.alias:
        p.model_alias = {args.alias}
    p.hostnames = [args.host]
    p.port = args.port
    p.use_jinja = args.jinja
    p.n_ctx = args.ctx_size
    p.n_parallel = args.parallel
    p.cpuparams.n_threads = args.threads
    p.cpuparams_batch.n_threads = args.threads
    p.verbosity = args.verbosity

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Loads the model and starts listening (/health answers 503 until the model is loaded).
    server = xlc.Server(p)
    print(f"llama_server: {args.alias or args.model} on {server.listening_address}", file=sys.stderr, flush=True)
    while not stop.wait(3600):
        pass
    del server  # stops the HTTP listener and the inference loop


if __name__ == "__main__":
    main()
