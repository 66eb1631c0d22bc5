"""Training metrics: always a JSONL file; TensorBoard and W&B only when installed and enabled."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from longva_cli.console import stderr

METRICS = "metrics.jsonl"
METRICS_FIELDS = ("step",)  # what a metrics.jsonl line needs to count


class MetricsLog:
    """One JSON object per logged step in `<output_dir>/metrics.jsonl` (appended on resume)."""

    def __init__(self, output_dir: Path, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "longva", config: dict[str, Any] | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = (output_dir / METRICS).open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                stderr.print("[yellow]logging.tensorboard is on but tensorboard is not installed; skipping it.[/yellow]")
        if wandb:
            try:
                import wandb as wandb_module

                self.wandb = wandb_module.init(project=wandb_project, config=config, dir=str(output_dir))
            except ImportError:
                stderr.print("[yellow]logging.wandb is on but wandb is not installed; skipping it.[/yellow]")

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (later records for a step win, as after a resume);
    damaged lines are skipped (a resumed run sets them aside)."""
    from longva_cli.engine.runs import read_lines

    by_step = {record["step"]: record for record in read_lines(path, METRICS_FIELDS) if isinstance(record["step"], int)}
    return [by_step[s] for s in sorted(by_step)]
