"""The training loop: exact resume, non-finite stops, schedule, checkpoint housekeeping, data kinds."""

import math

import pytest
import torch
from interrupt import Interrupt, stop_at

from model.config import Config
from model.training.loop import NonFiniteError, TrainConfig, train
from model.transformer import Transformer

CONFIG = Config.preset("tiny", decoder_layers=0, heads=("mlm",))  # dropout stays on: RNG state must resume too


def make_batches(n=4, b=4, t=12):
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        ids = torch.randint(5, CONFIG.vocab_size, (b, t), generator=g)
        labels = torch.where(torch.rand(b, t, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        labels[:, 0] = ids[:, 0]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "mlm_labels": labels})
    return batches


def fresh_model(seed):
    torch.manual_seed(seed)
    return Transformer(CONFIG)


def run(steps=8, **kwargs):
    return TrainConfig(steps=steps, lr=1e-3, progress=False, **kwargs)


@pytest.mark.parametrize("as_iterable", [False, True])
def test_resume_continues_with_the_same_losses_and_weights(tmp_path, as_iterable):
    batches = make_batches()
    data = (lambda: iter(batches)) if as_iterable else batches

    class Reiterable:  # an iterable without random access: resume must skip ahead
        def __iter__(self):
            return data()

    source = Reiterable() if as_iterable else data
    straight_model = fresh_model(0)
    straight = train(straight_model, source, run())

    interrupted_model = fresh_model(0)
    with pytest.raises(Interrupt):
        train(interrupted_model, source, run(checkpoint_dir=str(tmp_path), checkpoint_every=3), callback=stop_at(5))
    resumed_model = fresh_model(123)  # a different init: everything must come from the checkpoint
    resumed = train(resumed_model, source, run(checkpoint_dir=str(tmp_path), checkpoint_every=3))

    assert resumed.resumed_from == 3
    assert resumed.losses == straight.losses  # exact: fp32 CPU, same seed
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoints_are_pruned_and_leftovers_removed(tmp_path):
    (tmp_path / ".tmp-step-00000099").mkdir()
    train(fresh_model(0), make_batches(), run(steps=6, checkpoint_dir=str(tmp_path), checkpoint_every=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]
    result = train(fresh_model(0), make_batches(), run(steps=6, checkpoint_dir=str(tmp_path)))
    assert result.resumed_from == 6 and len(result.losses) == 6  # finished runs are not redone


def test_nan_loss_stops_naming_the_step():
    calls = []

    def loss_fn(m, batch):  # the third step's loss is NaN
        calls.append(1)
        loss = m(**batch).loss
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(NonFiniteError, match="loss is nan at step 3"):
        train(fresh_model(0), make_batches(), run(), loss_fn=loss_fn)


def test_infinite_gradient_stops_before_the_update():
    model = fresh_model(0)
    param = model.embeddings.norm.bias

    def loss_fn(m, batch):  # sqrt at 0: a finite loss whose gradient is infinite
        return m(**batch).loss + torch.sqrt((param - param.detach()).sum())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="gradient norm is .* at step 1"):
        train(model, make_batches(), run(), loss_fn=loss_fn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_fits_a_batch():
    batches = make_batches(n=1)
    result = train(fresh_model(0), batches, TrainConfig(steps=40, lr=3e-3, warmup_steps=0, progress=False))
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.tokens == 40 * batches[0]["input_ids"].numel()


def test_schedule_values():
    config = TrainConfig(steps=110, lr=1.0, warmup_steps=10)
    assert config.lr_at(0) == pytest.approx(0.1)
    assert config.lr_at(9) == pytest.approx(1.0)
    assert config.lr_at(60) == pytest.approx(0.5)
    cosine = TrainConfig(steps=110, lr=1.0, warmup_steps=10, schedule="cosine")
    assert cosine.lr_at(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert TrainConfig(steps=100).warmup == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be >= 1"),
        (dict(steps=5, lr=0), "lr must be > 0"),
        (dict(steps=5, schedule="step"), "schedule must be one of linear, cosine, constant"),
        (dict(steps=5, parallel="zero3"), "parallel must be one of ddp, fsdp; got 'zero3'"),
        (dict(steps=5, clip=-1.0), "clip must be"),
        (dict(steps=5, betas=(0.9, 1.5)), "betas"),
    ],
)
def test_invalid_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_bad_data_is_refused_clearly():
    with pytest.raises(TypeError, match="single batch dict"):
        train(fresh_model(0), make_batches()[0], run())
    with pytest.raises(ValueError, match="empty collection"):
        train(fresh_model(0), [], run())
    with pytest.raises(ValueError, match="no label keys"):
        train(fresh_model(0), [{"input_ids": make_batches()[0]["input_ids"]}], run())


def test_shuffling_dataloader_resumes_exactly(tmp_path):
    from torch.utils.data import DataLoader

    rows = [{k: v[i] for k, v in b.items()} for b in make_batches(n=2) for i in range(4)]
    loader = DataLoader(rows, batch_size=4, shuffle=True)  # draws its order from the global RNG

    def sampling_callback(done, loss):  # uses the RNG between steps: must not shift the run
        torch.rand(3)

    straight = train(fresh_model(0), loader, run(), callback=sampling_callback)
    with pytest.raises(Interrupt):
        train(fresh_model(0), loader, run(checkpoint_dir=str(tmp_path), checkpoint_every=2), callback=stop_at(3))
    resumed = train(
        fresh_model(5), loader, run(checkpoint_dir=str(tmp_path), checkpoint_every=2), callback=sampling_callback
    )
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses


def test_one_shot_iterator_that_runs_out_is_named():
    with pytest.raises(ValueError, match="one-shot iterator that ran out after 4 batches"):
        train(fresh_model(0), iter(make_batches()), run(steps=6))


def test_resuming_with_other_settings_is_refused(tmp_path):
    train(fresh_model(0), make_batches(), run(steps=2, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="written with lr=0.001 but this run has lr=0.002"):
        train(
            fresh_model(0), make_batches(), TrainConfig(steps=2, lr=2e-3, progress=False, checkpoint_dir=str(tmp_path))
        )


def test_a_checkpoint_keeps_each_rank_s_rng_streams_under_its_rank(tmp_path):
    """Issue 19: checkpoints kept rank 0's CUDA states for every rank, keyed by device index and sorted as strings."""
    from safetensors.torch import load_file

    train(fresh_model(0), make_batches(), run(steps=2, checkpoint_dir=str(tmp_path)))
    (step,) = sorted(tmp_path.glob("step-*"))
    rng = sorted(k for k in load_file(step / "optimizer.safetensors") if k.startswith("rng."))
    assert rng == ["rng.cpu.0"]  # a CPU run holds no GPU stream; before, any machine with CUDA saved all of its GPUs'


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropout_on_a_gpu_resumes_with_the_uninterrupted_losses(tmp_path):
    cuda = dict(device="cuda")
    dropout = lambda seed: Transformer(CONFIG.replace(dropout=0.3, attention_dropout=0.0))  # noqa: E731
    torch.manual_seed(0)
    straight = train(dropout(0), make_batches(), run(**cuda))
    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        train(
            dropout(0),
            make_batches(),
            run(checkpoint_dir=str(tmp_path), checkpoint_every=3, **cuda),
            callback=stop_at(5),
        )
    resumed = train(dropout(0), make_batches(), run(checkpoint_dir=str(tmp_path), checkpoint_every=3, **cuda))
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses  # the GPU's dropout stream went on
