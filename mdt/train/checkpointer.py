"""Writing a training checkpoint: DeepSpeed state for an exact resume, the same optimizer state whole (for a
resume on another world size, mdt.train.elastic), the weights and EMA exports, then the records that make
it count (files.json, LATEST.json) and the run's ema/ copy (layout: run_dir)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch

from mdt import distributed
from mdt.checkpoints.export_folder import write_export
from mdt.train.clock import RunClock
from mdt.train.elastic import ELASTIC_DIR, save_elastic_state
from mdt.train.ema import EMA
from mdt.train.engine import Engine
from mdt.train.run_dir import RunDir, replace_folder, tag_for


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became non-finite); the last good checkpoint remains."""


@dataclass
class Checkpointer:
    engine: Engine
    run: RunDir
    ema: EMA
    model: torch.nn.Module  # the module whose layout the exports record (model_config.json)
    diffusion: dict  # the noise schedule, written as diffusion.json beside each export
    data_manifest: dict  # the latents trained on, written as data_manifest.json beside each export
    keep_last: int
    world_size: int
    global_batch: int  # what a resume on another world size keeps
    clock: RunClock  # its agreed seconds are saved as train_seconds

    def save(self, step: int) -> None:
        """Collective: every rank writes its optimizer partition, rank 0 the exports and records. A failed
        write removes the partial folder and raises TrainingError; the previous checkpoint stays in charge."""
        run = self.run
        tag = tag_for(step)
        try:
            self.engine.save(run.checkpoints, tag, {"step": step, "train_seconds": self.clock.seconds})
            layout = {"world_size": self.world_size, "zero_stage": self.engine.zero_stage,
                      "global_batch": self.global_batch}
            save_elastic_state(self.engine, run.checkpoints / tag / ELASTIC_DIR,
                               {"step": step, "train_seconds": self.clock.seconds, **layout})
            weights = self.engine.full_fp32_params()  # collective under ZeRO: all ranks gather, rank 0 writes
            with self.engine.masters_replaced_by(self.ema.shadow):
                ema_weights = self.engine.full_fp32_params()
            if distributed.is_main():
                folder = run.checkpoints / tag
                write_export(folder / "ema", self.model, self.diffusion, weights=ema_weights,
                             data_manifest=self.data_manifest)
                write_export(folder / "weights", self.model, self.diffusion, weights=weights,
                             data_manifest=self.data_manifest)
            distributed.barrier()  # every rank's optimizer partition is on disk
            if distributed.is_main():
                run.record_files(tag)
                run.mark_latest(tag, step, layout)
                replace_folder(folder / "ema", run.ema)
                run.prune(self.keep_last)
        except OSError as err:  # a full disk, a lost mount, no permission: stop, the previous one stays
            previous = run.latest()
            if distributed.is_main():
                shutil.rmtree(run.checkpoints / tag, ignore_errors=True)  # free what the partial save took
            raise TrainingError(f"writing checkpoint {tag} into {run.checkpoints} failed ({err}); "
                                f"{'the checkpoint ' + previous[0] if previous else 'no earlier checkpoint'} stays "
                                f"in charge; free space or fix the folder, then --resume {run.root}") from err
        distributed.barrier()
