"""longva: LongVA as a command-line toolkit and a Python library.

    from longva_cli import LongVA
    model = LongVA.from_pretrained("lmms-lab/LongVA-7B-DPO")
    print(model.ask("movie.mp4", "What happens after the car stops?", frames=128).answer)
"""

__version__ = "0.1.0"

__all__ = ["LongVA", "__version__"]


def __getattr__(name: str):
    # Importing torch and transformers costs seconds; `longva --help` must not pay for it.
    if name == "LongVA":
        from longva_cli.api import LongVA

        return LongVA
    raise AttributeError(name)
