"""The trainer's data_wait: the time a step is blocked on its micro-batches, logged per step
(seconds and fraction of the step) and written to TensorBoard. A loader that sleeps in ``next()``
gives a lower bound the measurement must reach whatever the machine's load; a fast one stays
below it."""

import time

import pytest

from megatron_finevit.testing.multirank import run_world
from megatron_finevit.training.metrics import DataWaitTimer

SLEEP_S = 0.1      # per micro-batch
MICROBATCHES = 2   # per step: global batch 4, micro-batches of 2, one rank
STEPS = 3


class _Sleepy:
    """Batches after a fixed sleep; a loader that loads ahead reports ``prepare_wait_s``."""

    def __init__(self, sleep_s):
        self.sleep_s, self.prepare_wait_s, self.closed = sleep_s, 0.0, False

    def __next__(self):
        time.sleep(self.sleep_s)
        return 1

    def state_dict(self):
        return {"at": 7}

    def close(self):
        self.closed = True


def test_timer_counts_next_and_prepare():
    data = _Sleepy(0.02)
    timer = DataWaitTimer(data)
    assert [next(timer), next(timer)] == [1, 1]
    data.prepare_wait_s += 5.0  # the loader's own account of time spent loading ahead
    first = timer.take_wait_s()
    assert first >= 5.04
    data.sleep_s = 0.0
    next(timer)
    assert timer.take_wait_s() < first - 5.0  # counting restarted; prepare counted once
    assert timer.state_dict() == {"at": 7}
    timer.close()
    assert data.closed
    DataWaitTimer(iter([])).close()  # data without workers: nothing to close


def data_wait_world(rank, world_size, tensorboard_root):
    from megatron_finevit.config.train import TrainConfig
    from megatron_finevit.testing.toy_stage import ToyBatches, ToyLMStage
    from megatron_finevit.training.trainer import Trainer

    class SleepyBatches(ToyBatches):
        sleep_s = 0.0

        def __next__(self):
            time.sleep(self.sleep_s)
            return super().__next__()

    ToyLMStage.build_data = lambda self, dp_rank, dp_size: SleepyBatches(self.cfg, self.run.seed,
                                                                         dp_rank)
    out = {}
    for name, SleepyBatches.sleep_s in (("slow", SLEEP_S), ("fast", 0.0)):
        cfg = TrainConfig(stage="toy_lm", train_steps=STEPS, global_batch_size=2 * MICROBATCHES,
                          stage_config={"num_layers": 1, "micro_batch_size": 2})
        cfg.eval.at_start = cfg.eval.at_end = False
        cfg.logging.log_interval = 1
        cfg.logging.progress_bar = False
        cfg.logging.tensorboard_dir = f"{tensorboard_root}/{name}"
        trainer = Trainer(cfg)
        logged, sink_step = [], trainer.sink.step
        trainer.sink.step = lambda step, values: (logged.append(dict(values)),
                                                  sink_step(step, values))
        trainer.train()
        out[name] = logged
    return out


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorboard")
    return run_world(data_wait_world, 1, args=(str(root),), timeout_s=300)[0], root


def test_slow_loader_shows_in_data_wait(logged):
    runs, _ = logged
    slow, fast = runs["slow"], runs["fast"]
    assert len(slow) == len(fast) == STEPS
    for values in slow:
        # the injected sleeps are a lower bound on the time blocked, whatever the load
        assert values["data_wait_s"] >= MICROBATCHES * SLEEP_S
        assert values["data_wait_s"] <= values["step_time_s"]
        assert 0.0 < values["data_wait"] <= 1.0
    for values in fast:
        assert 0.0 <= values["data_wait"] <= 1.0
    # a fast loader blocks less in all its steps together than the slow one sleeps in one step
    assert sum(v["data_wait_s"] for v in fast) < MICROBATCHES * SLEEP_S


def test_data_wait_goes_to_tensorboard(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs, root = logged
    events = EventAccumulator(str(root / "slow"))
    events.Reload()
    assert {"data_wait", "data_wait_s"} <= set(events.Tags()["scalars"])
    written = [e.value for e in events.Scalars("data_wait_s")]
    assert written == pytest.approx([v["data_wait_s"] for v in runs["slow"]])
