"""The iteration log line averages over the iterations this run trained in the interval, as
Megatron-LM's training_log counts them: a run resumed off the log interval prints, at the next
log iteration, the mean of exactly the iterations it ran (not a share of a full interval)."""
import re

import pytest

from ascendspeed.training_log import LogInterval
from test_pretrain import corpus, model_args  # noqa: F401 (corpus is a fixture)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_interval_counts_its_own_iterations_and_pauses_its_timer():
    clock = Clock()
    interval = LogInterval(clock)
    interval.add(2.0, updated=True)
    clock.now += 3.0
    interval.add(float("nan"), updated=False)  # a skipped fp16 overflow: counted, not averaged
    interval.pause()
    clock.now += 50.0  # evaluation / a checkpoint save: not training time
    interval.resume()
    interval.add(4.0, updated=True)
    clock.now += 3.0
    assert (interval.iterations, interval.skipped, interval.nans) == (3, 1, 1)
    assert interval.mean_losses() == {"lm loss": 3.0}
    assert interval.seconds_per_iteration() == pytest.approx(2.0)  # 6 s of training / 3
    interval.reset()
    interval.add(1.0, updated=False)
    assert interval.mean_losses() == {}  # every step skipped: Megatron prints no loss
    assert (interval.iterations, interval.skipped, interval.nans) == (1, 1, 0)


def _lm_losses(lines):
    """{iteration: the printed 'lm loss' string} from the trainer's iteration lines."""
    found = {}
    for line in lines:
        match = re.search(r" iteration +(\d+)/ *\d+ \|.*\| lm loss: ([0-9.E+-]+) \|", line)
        if match:
            found[int(match.group(1))] = match.group(2)
    return found


def _train(corpus, *extra):
    from ascendspeed import training
    from ascendspeed.arguments import PretrainConfig, parse_args

    config = PretrainConfig.from_args(parse_args(model_args(corpus, "--log-interval", "5", *extra)),
                                      world_size=1)
    lines = []
    result = training.pretrain(config, log=lines.append)
    return result, lines


def test_resumed_run_off_the_log_interval_logs_the_mean_of_its_own_iterations(corpus, tmp_path):
    straight, straight_lines = _train(corpus)
    assert len(straight.losses) == 10
    printed = _lm_losses(straight_lines)
    assert printed == {5: f"{sum(straight.losses[0:5]) / 5:.6E}",
                       10: f"{sum(straight.losses[5:10]) / 5:.6E}"}

    save = str(tmp_path / "checkpoints")
    first, _ = _train(corpus, "--save", save, "--exit-interval", "7")
    assert first.iteration == 7 and first.losses == straight.losses[:7]
    resumed, resumed_lines = _train(corpus, "--save", save, "--load", save)
    assert resumed.losses == straight.losses[7:10]  # the resume is exact
    # 3 iterations trained in this run's first interval: their mean, not 3/5 of it.
    assert _lm_losses(resumed_lines) == {10: f"{sum(straight.losses[7:10]) / 3:.6E}"}


@pytest.mark.parametrize("flag,logged", [((), True), (("--no-log-loss-scale-to-tensorboard",), False)])
def test_loss_scale_reaches_tensorboard_unless_turned_off(corpus, tmp_path, flag, logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    _train(corpus, "--train-iters", "5", "--tensorboard-dir", str(board), *flag)
    events = EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "lm loss" in tags and ("loss-scale" in tags) == logged
