"""Lightning callbacks of a training run: validate the final epoch, time each epoch, fit a time budget,
average BatchNorm statistics over DDP ranks."""
from __future__ import annotations

import math
import time

import lightning as L
import torch


class ValidateLastEpoch(L.Callback):
    """With `val_every` > 1, still validate after the final epoch: the annealed end of the cosine schedule
    is usually the best checkpoint (Lightning alone skips it when val_every does not divide max_epochs).
    Follows max_epochs when a TimeBudget changes it."""

    def __init__(self, val_every: int) -> None:
        self.val_every = val_every

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        trainer.check_val_every_n_epoch = 1 if last else self.val_every


class AverageBatchNormStats(L.Callback):
    """For DDP without the per-step buffer sync (hardware.ddp_without_step_buffer_sync): after each epoch's last
    step, every rank gets the mean of the ranks' BatchNorm running statistics, so validation, mining and the
    checkpoints see one model. Replaces DDP's broadcast of rank 0's buffers before every forward (a sync per
    step, ~1.5 % of a CPU rank's time)."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int
                           ) -> None:
        if trainer.world_size < 2 or batch_idx + 1 != trainer.num_training_batches:
            return
        for m in module.modules():   # once an epoch: one all-reduce per buffer costs nothing worth batching
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for b in (m.running_mean, m.running_var):
                    if b is not None:
                        torch.distributed.all_reduce(b)    # SUM, in place: gloo has no AVG
                        b /= trainer.world_size


class EpochTimer(L.Callback):
    """Wall seconds of each epoch, start to start (training, validation and hard-negative mining):
    RUN/metrics.json `epoch_s`, to see what a layout (processes, loader workers, val_every) costs; and the
    run's whole training time (`train_time_s`). Both travel in the checkpoint, so a resumed run counts the
    epochs and time before its checkpoint too, not only its own."""

    def __init__(self, started: float | None = None) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None
        self.started = time.time() if started is None else started   # this process's start (data caching included)
        self.spent_before = 0.0                                          # seconds of the run before a resume

    def total_s(self) -> float:
        """Seconds the run has trained, resumes included (up to each checkpoint it resumed from)."""
        return self.spent_before + time.time() - self.started

    def state_dict(self) -> dict:
        now = [round(time.time() - self._start, 2)] if self._start is not None else []   # the epoch being saved
        return {"seconds": self.seconds + now, "spent_s": self.total_s()}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = [float(s) for s in state.get("seconds", [])]
        self.spent_before = float(state.get("spent_s", 0.0))

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        now = time.time()
        if self._start is not None:
            self.seconds.append(round(now - self._start, 2))
        self._start = now

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._start is not None:
            self.seconds.append(round(time.time() - self._start, 2))
            self._start = None


def plan_epochs(done: int, committed: int, max_epochs: int, left_s: float, epoch_s: float) -> int:
    """How many epochs the run should have in all, `done` finished and `left_s` seconds of budget left at
    `epoch_s` each. Never below `done` + 1 unless the previous plan (`committed`) ended here: the final
    epoch is always announced one epoch ahead, so it is validated and the schedule anneals into it."""
    if committed <= done:
        return done
    fits = done + max(0, math.floor(left_s / max(epoch_s, 1e-9)))
    return max(done + 1, min(max_epochs, fits))


class TimeBudget(L.Callback):
    """Fit training into `minutes` of wall time (counted from `started`, the run's start: data caching
    included) by planning the epoch count after each epoch from the measured epoch time; the cosine
    schedule follows the plan (module.schedule_epochs), so a cut run still anneals. Never adds epochs
    beyond the config's max_epochs. Rank 0's clock decides and is broadcast, so DDP ranks agree."""

    def __init__(self, minutes: float, started: float) -> None:
        self.budget_s = minutes * 60.0
        self.started = started
        self.spent_before = 0.0          # seconds used by the run before a resume
        self.fit_start = started
        self.fit_epochs_start = 0
        self.max_epochs = 0
        self.plans: list[int] = []
        self.stored_budget_s = self.budget_s   # the budget a resumed run was planned with
        self.epoch_s = 0.0                     # the latest measured mean epoch time (0: none yet)

    def _elapsed(self) -> float:
        return self.spent_before + time.time() - self.started

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        asked = int(trainer.max_epochs)
        if self.plans and (self.max_epochs, self.stored_budget_s) != (asked, self.budget_s):
            # resumed with more (or fewer) epochs or minutes asked for: plan afresh within them, the time
            # already spent included, instead of stopping where the earlier plan ended
            if trainer.is_global_zero:
                print(f"resuming after {trainer.current_epoch} epochs with trainer.max_epochs={asked} and "
                      f"max_minutes={self.budget_s / 60:g} (were {self.max_epochs} and {self.stored_budget_s / 60:g}): "
                      "the epoch plan starts again from these", flush=True)
            self.plans, self.max_epochs = [], asked
        self.max_epochs = self.max_epochs or asked
        self.fit_start, self.fit_epochs_start = time.time(), trainer.current_epoch
        if self.plans:                   # resumed as it was: the plan the run had reached, not the config's count
            trainer.fit_loop.max_epochs = self.plans[-1]
        elif trainer.current_epoch > 0 and self.epoch_s > 0:
            # resumed with another budget: plan now from the epoch time measured before, else the first epoch's
            # schedule spans max_epochs and a run annealed near its end trains one epoch near the peak rate
            trainer.fit_loop.max_epochs = self._plan(trainer, trainer.current_epoch, self.max_epochs, self.epoch_s)
        module.schedule_epochs = int(trainer.max_epochs)

    def _plan(self, trainer: L.Trainer, done: int, current: int, epoch_s: float) -> int:
        """The epochs that fit in what is left of the budget at `epoch_s` each, rank 0's count on every rank."""
        planned = plan_epochs(done, current, self.max_epochs, self.budget_s - self._elapsed(), epoch_s)
        return int(trainer.strategy.broadcast(planned, src=0))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        epoch_s = (time.time() - self.fit_start) / max(1, done - self.fit_epochs_start)
        self.epoch_s = epoch_s
        planned = self._plan(trainer, done, int(trainer.max_epochs), epoch_s)
        if planned < self.max_epochs and all(p == self.max_epochs for p in self.plans) and trainer.is_global_zero:
            print(f"\ntime budget {self.budget_s / 60:g} min (trainer.max_minutes): about {planned} of "
                  f"{self.max_epochs} epochs fit at {epoch_s:.0f} s each; the schedule follows", flush=True)
        trainer.fit_loop.max_epochs = planned
        module.schedule_epochs = planned
        # every rank holds the broadcast plan: syncing averages equal values (and silences Lightning's warning)
        module.log("trainer/planned_epochs", float(planned), on_epoch=True, sync_dist=True)
        self.plans.append(planned)

    def state_dict(self) -> dict:
        return {"spent_s": self._elapsed(), "max_epochs": self.max_epochs, "plans": self.plans,
                "budget_s": self.budget_s, "epoch_s": self.epoch_s}

    def load_state_dict(self, state: dict) -> None:
        self.spent_before = float(state["spent_s"])
        self.max_epochs = int(state["max_epochs"])
        self.plans = list(state["plans"])
        self.stored_budget_s = float(state.get("budget_s", self.budget_s))   # older checkpoints: unchanged
        self.epoch_s = float(state.get("epoch_s", 0.0))     # older checkpoints: unknown, the first epoch measures it
