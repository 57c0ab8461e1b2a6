"""Megatron-LM's OptimizerParamScheduler: warm-up, linear/cosine/constant decay, samples, resume."""
import math

import pytest
import torch

from ascendspeed.arguments import PretrainConfig, parse_args
from ascendspeed.optimizer.lr_scheduler import AnnealingLR, OptimizerParamScheduler


def lr_approx(value):
    """The schedule is float64 arithmetic: the same formula written another way agrees to a few
    float64 ulps, so 1e-12 relative (pytest.approx's default 1e-6 would let a formula that is
    off in its 7th digit pass)."""
    return pytest.approx(value, rel=1e-12, abs=1e-15)


class FakeOptimizer:
    def __init__(self, *groups):
        self.param_groups = [dict(g) for g in groups] or [{}]


def scheduler(style="cosine", warmup=10, decay=110, max_lr=1.0, min_lr=0.1, **kwargs):
    return OptimizerParamScheduler(FakeOptimizer(), max_lr=max_lr, min_lr=min_lr,
                                   lr_warmup_steps=warmup, lr_decay_steps=decay,
                                   lr_decay_style=style, **kwargs)


def lr_at(sched, steps):
    sched.num_steps = steps
    return sched.get_lr()


def test_warmup_is_linear_from_zero_to_max():
    s = scheduler()
    assert s.optimizer.param_groups[0]["lr"] == 0.0  # step(0) in the constructor
    assert lr_at(s, 1) == lr_approx(0.1) and lr_at(s, 5) == lr_approx(0.5)
    assert lr_at(s, 10) == 1.0  # warm-up end == max


def test_warmup_init():
    s = scheduler(init_lr=0.2)
    assert lr_at(s, 0) == 0.2 and lr_at(s, 5) == lr_approx(0.6) and lr_at(s, 10) == 1.0


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_decay_ends_at_min_and_stays(style):
    s = scheduler(style)
    assert lr_at(s, 110) == lr_approx(0.1) and lr_at(s, 111) == 0.1 and lr_at(s, 10**6) == 0.1


def test_cosine_values():
    s = scheduler("cosine")
    assert lr_at(s, 60) == lr_approx((1.0 + 0.1) / 2)  # midpoint
    # a quarter of the way: 0.1 + 0.9 * 0.5 * (cos(pi/4) + 1)
    assert lr_at(s, 35) == lr_approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi / 4) + 1))
    assert lr_at(s, 11) < 1.0


def test_linear_values():
    s = scheduler("linear")
    assert lr_at(s, 60) == lr_approx(0.55) and lr_at(s, 35) == lr_approx(1.0 - 0.9 / 4)


def test_constant_ignores_decay():
    s = scheduler("constant")
    assert lr_at(s, 5) == lr_approx(0.5) and lr_at(s, 60) == 1.0 and lr_at(s, 10**6) == 1.0


def test_inverse_square_root():
    s = scheduler("inverse-square-root", warmup=4, decay=1000, min_lr=0.0)
    assert lr_at(s, 4) == 1.0 and lr_at(s, 16) == lr_approx(0.5)


def test_no_warmup_starts_at_max():
    assert scheduler(warmup=0).optimizer.param_groups[0]["lr"] == 1.0


def test_steps_in_samples_match_steps_in_iterations():
    """Megatron counts samples: iteration flags x global batch; step(global batch) per iteration."""
    gbs = 32
    by_samples = scheduler("cosine", warmup=10 * gbs, decay=110 * gbs)
    by_iters = scheduler("cosine", warmup=10, decay=110)
    for _ in range(120):
        assert by_samples.step(gbs) == lr_approx(by_iters.step(1))
    assert by_samples.num_steps == 120 * gbs


def test_step_sets_every_group_with_lr_mult():
    optimizer = FakeOptimizer({"params": []}, {"params": [], "lr_mult": 0.5})
    s = OptimizerParamScheduler(optimizer, max_lr=1.0, min_lr=0.0, lr_warmup_steps=0,
                                lr_decay_steps=10, lr_decay_style="linear")
    s.step(5)
    assert [g["lr"] for g in optimizer.param_groups] == [lr_approx(0.5), lr_approx(0.25)]


def test_real_torch_optimizer():
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW(params, lr=123.0)
    s = AnnealingLR(optimizer, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=10,
                    lr_decay_style="cosine")
    assert optimizer.param_groups[0]["lr"] == 0.0
    s.step(1)
    assert optimizer.param_groups[0]["lr"] == lr_approx(5e-4)


def test_state_dict_round_trip_and_resume():
    a = scheduler()
    for _ in range(37):
        a.step(1)
    b = scheduler()
    b.load_state_dict(a.state_dict())
    assert b.num_steps == 37 and b.get_lr() == a.get_lr()
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    assert set(a.state_dict()) == {"max_lr", "lr_warmup_steps", "num_steps", "lr_decay_style",
                                   "lr_decay_steps", "min_lr"}


def test_load_state_dict_checks_and_legacy_keys():
    saved = scheduler(max_lr=2.0).state_dict()
    with pytest.raises(ValueError, match="max_lr is 1.0 here but 2.0 in the checkpoint"):
        scheduler().load_state_dict(saved)
    taken = scheduler(use_checkpoint_opt_param_scheduler=True)
    taken.load_state_dict(saved)
    assert taken.max_lr == 2.0
    kept = scheduler(override_opt_param_scheduler=True)
    kept.load_state_dict(saved)
    assert kept.max_lr == 1.0
    legacy = {"max_lr": 1.0, "warmup_steps": 10, "num_steps": 60, "decay_style": "cosine",
              "decay_steps": 110, "min_lr": 0.1}  # Megatron-DeepSpeed's AnnealingLR keys
    s = scheduler()
    s.load_state_dict(legacy)
    assert s.get_lr() == lr_approx(0.55)


@pytest.mark.parametrize("kwargs,message", [
    (dict(warmup=110), "lr_warmup_steps"), (dict(decay=0, warmup=0), "lr_decay_steps"),
    (dict(min_lr=2.0), "min_lr"), (dict(style="step"), "lr_decay_style"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        scheduler(**kwargs)


def test_from_config(tmp_path):
    for ext in (".idx", ".bin"):
        (tmp_path / f"d{ext}").write_bytes(b"")
    args = parse_args(["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "2",
                       "--seq-length", "8", "--position-embedding-type", "alibi",
                       "--micro-batch-size", "2", "--global-batch-size", "4",
                       "--train-samples", "400", "--lr-warmup-samples", "40",
                       "--lr-decay-style", "cosine", "--lr", "1e-3", "--min-lr", "1e-4",
                       "--data-path", str(tmp_path / "d"), "--tokenizer-type", "PretrainedFromHF",
                       "--tokenizer-name-or-path", "tok"])
    config = PretrainConfig.from_args(args, world_size=1)
    s = OptimizerParamScheduler.from_config(FakeOptimizer(), config)
    gbs = config.training.global_batch_size
    for _ in range(10):  # 10 iterations x 4 samples = the 40-sample warm-up
        s.step(gbs)
    assert s.get_lr() == lr_approx(1e-3)
    for _ in range(config.training.train_iters - 10):
        s.step(gbs)
    assert s.get_lr() == lr_approx(1e-4)
