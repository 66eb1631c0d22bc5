"""Defaults that the commands, their settings and the engine share, each written once.

Nothing is imported here, so a command's signature reads them without loading torch.
"""

PREFILL_CHUNK = 4096  # tokens per prefill step: bounds the activations of a long prompt
TEMPERATURE = 0.5  # the original demo's sampling temperature
MAX_NEW_TOKENS = 1024  # most tokens an answer may have (`ask`, `chat`, the engine's sampling, the memory plan; `serve`'s per-request default)
VISION_BATCH = 16  # frames decoded, preprocessed and encoded together: bounds memory at any length
FRAMES = 32  # frames sampled uniformly from a video (`ask`, `chat`, `serve`, `eval`, `align`'s videos; vLLM's default too)
LOSS_CHUNK = 4096  # tokens per cross-entropy chunk in training: bounds the logits in memory
