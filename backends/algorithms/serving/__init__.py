"""Serving: requests scheduled onto a model, written once over the adapter contract (vLLM's layering).

- `request`: what a client sends (`Request`) and gets back (`Completion`), and the serving parameters;
- `block_manager`: owns KV memory: contiguous rows, or a block pool with block tables and a prefix cache;
- `scheduler`: decides, every step, which sequences run and how many tokens each; never touches a tensor;
- `runner`: turns a step's plan into one model call and samples each request's next token; decides nothing;
- `engine`: the loop that ties them together for each `Batching` strategy.
"""
from .engine import serve
from .request import Completion, Request, ServingConfig, ServingResult

__all__ = ["Completion", "Request", "ServingConfig", "ServingResult", "serve"]
