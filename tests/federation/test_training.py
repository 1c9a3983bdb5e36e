"""The local step loop (fedmml.federation.training): what a GPU-first step changes and what it must not."""

import copy
import warnings
from pathlib import Path

import pytest
import torch

from fedmml.config import ConfigError, load_config
from fedmml.data.coco import CaptionDataset
from fedmml.events import ClientDropped
from fedmml.experiment import build_setup
from fedmml.federation import training
from fedmml.models.build import build_model

TEXTS = ["a cat", "two red apples on a table next to a bowl of soup", "a dog"]
# Tiny without dropout: compiled code draws its dropout masks differently from eager code.
NO_DROPOUT = [
    "model.head.dropout=0.0",
    'model.text.arch={model_type="bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, '
    "intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0}",
]
STEPS = 192 // 3 // 16  # per client and round on tiny


def _cfg(emoji_root: Path, *extra: str):
    return load_config("tiny", [f'data.root="{emoji_root}"', "run.threads=1", "eval.every=0", *extra])


def test_a_cached_client_reads_no_pixels(emoji_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # lw's stages 2 and 3 train from the frozen-prefix cache, which holds every image's prefix output: the
    # loader draws the captions and reads no image (the cache's own fill reads each image once, apart).
    skips: list[frozenset] = []
    take = CaptionDataset.take

    def spy(self, index, epoch, skip=()):
        skips.append(frozenset(skip))
        return take(self, index, epoch, skip)

    monkeypatch.setattr(CaptionDataset, "take", spy)
    metrics = build_setup(_cfg(emoji_root, 'run.method="lw"')).run_rounds()
    per_round = len(skips) // len(metrics)
    first, later = skips[:per_round], skips[per_round:]
    assert first and all(s == frozenset() for s in first)  # stage 1 trains the stems: it reads pixels
    assert later and all(s == {"image", "text"} for s in later)


def test_text_is_padded_to_a_multiple_when_asked() -> None:
    cfg = load_config("tiny", ["model.text.pad_multiple=8"])
    text = build_model(cfg.model, load_weights=False).encoders["text"]
    ids = text.prepare(TEXTS)["input_ids"]
    assert ids.shape[1] % 8 == 0 and ids.shape[1] <= cfg.model.text.max_length
    with pytest.raises(ConfigError, match="pad_multiple must be >= 0 and divide max_length"):
        load_config("tiny", ["model.text.pad_multiple=5"])


def test_an_unpadded_batch_needs_no_mask_and_gets_the_same_features() -> None:
    model = build_model(load_config("tiny").model, load_weights=False).eval()
    text = model.encoders["text"]
    for m, d in {"image": 2, "text": 3}.items():
        model.encoders[m].grow_to(d)
    same = ["a cat", "a dog", "a cow"]  # one length: nothing is padded
    assert set(text.prepare(same)) == {"input_ids"} and set(text.prepare(TEXTS)) == {
        "input_ids",
        "attention_mask",
    }
    with torch.no_grad():
        without = text(text.prepare(same))
        with_mask = text(text.tokenize(same))
    torch.testing.assert_close(without, with_mask, rtol=0, atol=0)


def test_the_loop_reports_its_time_and_the_first_step(emoji_root: Path) -> None:
    setup = build_setup(_cfg(emoji_root, 'run.method="e2e"'))
    metrics = setup.run_rounds()
    last = setup.clients[0].last_training
    assert last.steps == STEPS and 0 <= last.data_wait_s <= last.train_s and last.first_step_at > 0
    assert all(0 < m["client_train_s"] <= m["client_s"] for m in metrics)


@pytest.mark.slow
def test_a_compiled_step_computes_the_eager_step() -> None:
    # One step's loss and gradients on the same weights and batch, against float64 arithmetic: compiled
    # code is as close to it as eager code (fused kernels add in another order). Measured: every gradient
    # 4e-6 from eager's (relative norm), eager 3.2e-6 and compiled 4.4e-6 from float64's; a 0.1 % error in
    # one tensor would stand out 200-fold.
    cfg = load_config("tiny", NO_DROPOUT)
    eager = build_model(cfg.model, load_weights=False)
    for encoder in eager.encoders.values():
        encoder.grow_to(encoder.total_blocks)
    compiled, exact = copy.deepcopy(eager), copy.deepcopy(eager).double()
    training.compile_model(compiled)
    torch.manual_seed(0)
    pixels = torch.rand(8, 3, 32, 32) * 2 - 1
    texts = TEXTS + ["a bird on a wire"] * 5
    results = []
    for model, image in ((eager, pixels), (compiled, pixels), (exact, pixels.double())):
        model.train()
        loss = model.loss({"image": image, "text": texts})
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
        results.append((loss.item(), grads))
    (eager_loss, eager_grad), (loss, grad), (_, exact_grad) = results

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert loss == pytest.approx(eager_loss, rel=1e-6)
    assert gap(grad, eager_grad) < 2e-5
    assert gap(grad, exact_grad) < 3 * gap(eager_grad, exact_grad)


@pytest.mark.slow
def test_a_compiled_run_keeps_its_figures(emoji_root: Path) -> None:
    # Two stages (each compiles its own graph): the second trains on a frozen, cached prefix.
    two = ['run.method="lw"', *NO_DROPOUT, "schedules.uniform.rounds=[1, 1, 0]"]
    eager = build_setup(_cfg(emoji_root, *two)).run_rounds()
    compiled = build_setup(_cfg(emoji_root, *two, "run.compile=true")).run_rounds()
    # The accounting measures the eager model whether or not the run compiles it.
    for key in ("client_flops", "client_peak_mem_bytes", "bytes_down"):
        assert [m[key] for m in compiled] == [m[key] for m in eager], key
    # Rounding apart (the test above), the same training: AdamW amplifies rounding at tiny's learning rate of
    # 1e-3 (the losses drifted 2.4e-3 apart by the 12th step), far less than another run would differ.
    assert [m["train_loss"] for m in compiled] == pytest.approx([m["train_loss"] for m in eager], rel=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(("method", "precision"), [("e2e", "fp32"), ("e2e", "bf16"), ("lw", "bf16")])
def test_a_step_never_waits_for_the_device(
    emoji_root: Path, monkeypatch: pytest.MonkeyPatch, method: str, precision: str
) -> None:
    # Every step but those the accounting measures for memory (it synchronises on purpose) runs with CUDA's
    # sync check on: an operation that makes the host wait for the device is reported with its line.
    cfg = _cfg(
        emoji_root,
        f'run.method="{method}"',
        f'run.precision="{precision}"',
        'run.device="cuda"',
        'cache.store="device"',
    )
    step = training._step
    checked_steps: list[int] = []
    waits: set[str] = set()

    def checked(steps, data, epoch):
        meter = steps.meter
        if meter._memory_steps.get(meter._stage, 0) > 0:
            return step(steps, data, epoch)
        checked_steps.append(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return step(steps, data, epoch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                found = [w for w in caught if "synchroniz" in str(w.message)]
                waits.update(f"{w.filename}:{w.lineno}: {w.message}" for w in found)

    monkeypatch.setattr(training, "_step", checked)
    dropped: list[str] = []
    listen = lambda e: dropped.append(e.reason) if isinstance(e, ClientDropped) else None  # noqa: E731
    build_setup(cfg, listen).run_rounds()
    assert checked_steps and not dropped, dropped
    assert not waits, "\n".join(sorted(waits))
