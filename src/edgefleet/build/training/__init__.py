"""Training-time compression of a user's model: structured pruning, knowledge distillation and quantization-aware
training, each result an ONNX candidate in the build's accuracy-gated search.

``config`` (the recipe's ``training`` section) and ``data`` (the training rows) import no torch; ``prune``,
``distill``, ``qat`` and ``export`` do, inside their functions; ``candidates`` ties them into the search.
"""
