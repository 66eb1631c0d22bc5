"""longva: LongVA as a command-line toolkit and a Python library.

    from longva_cli import LongVA
    model = LongVA.from_pretrained("lmms-lab/LongVA-7B-DPO")
    print(model.ask("movie.mp4", "What happens after the car stops?", frames=128).answer)
"""

import logging

__version__ = "0.1.0"


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


# transformers imports torchao (the optional `quantize` extra) whenever it builds a model; torchao
# then logs that its kernels for other GPUs are absent, and torch a deprecation of torchao's enums:
# noise on every command, nothing a user can act on.
for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).addFilter(_errors_only)

__all__ = ["LongVA", "__version__"]


def __getattr__(name: str):
    # Importing torch and transformers costs seconds; `longva --help` must not pay for it.
    if name == "LongVA":
        from longva_cli.api import LongVA

        return LongVA
    raise AttributeError(name)
