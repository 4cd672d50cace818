"""trainer.optim.AdamW against torch.optim.AdamW: the same weights step for step, interchangeable
checkpoints. That a trial then imports no compiler is checked in test_cli_train."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.optim import AdamW


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))


def _steps(model: torch.nn.Module, optimizer, lrs: list[float], seed: int = 1) -> None:
    """One step per learning rate (changed between steps, as the trainer's warm-up does) on fixed data."""
    generator = torch.Generator().manual_seed(seed)
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = torch.randn(5, 6, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        optimizer.step()


LRS = [1e-3, 2e-3, 3e-3, 3e-3]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "single-tensor"])
def test_updates_weights_as_torch_adamw_does(fused):
    ours_model, theirs_model = _model(), _model()
    ours = AdamW(ours_model.parameters(), lr=1e-3, weight_decay=0.05, fused=fused)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=1e-3, weight_decay=0.05, fused=fused, foreach=False)
    start = copy.deepcopy(ours_model)
    _steps(ours_model, ours, LRS)
    _steps(theirs_model, theirs, LRS)
    for mine, reference in zip(ours_model.parameters(), theirs_model.parameters()):
        # The same kernel (fused) or the same elementwise operations in the same order (single-tensor).
        assert torch.equal(mine, reference)
    assert all(not torch.equal(a, b) for a, b in zip(ours_model.parameters(), start.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fused_kernel_on_cuda_updates_weights_as_torch_adamw_does():
    ours_model, theirs_model = _model().cuda(), _model().cuda()
    ours = AdamW(ours_model.parameters(), lr=1e-3, weight_decay=0.05)
    assert ours.fused and ours.state[0]["step"].device.type == "cuda"  # torch keeps fused step counts on the device
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    for model, optimizer in ((ours_model, ours), (theirs_model, theirs)):
        generator = torch.Generator(device="cuda").manual_seed(1)
        for lr in LRS:
            optimizer.param_groups[0]["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            model(torch.randn(5, 6, device="cuda", generator=generator)).pow(2).mean().backward()
            optimizer.step()
    for mine, reference in zip(ours_model.parameters(), theirs_model.parameters()):
        assert torch.equal(mine, reference)


def test_a_parameter_without_a_gradient_is_left_alone():
    model = _model()
    frozen = model[0].weight
    before = frozen.detach().clone()
    optimizer = AdamW(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    model[2](torch.randn(5, 16)).pow(2).mean().backward()  # only the last layer gets gradients
    optimizer.step()
    assert torch.equal(frozen, before)
    assert optimizer.state[0]["step"].item() == 0 and optimizer.state[2]["step"].item() == 1


@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
def test_checkpoints_load_into_either_optimizer_and_training_continues_the_same(direction, tmp_path):
    """Two steps with one optimizer, saved (torch.save, loaded weights_only as the trainer does), two more
    with the other after loading: the same weights as four steps with torch.optim alone."""
    reference_model = _model()
    reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    _steps(reference_model, reference, LRS)

    first_model = _model()
    make_first, make_second = (
        (lambda p: AdamW(p, lr=1e-3, weight_decay=0.05), lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, fused=True))
        if direction == "ours-to-torch"
        else (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, fused=True), lambda p: AdamW(p, lr=1e-3, weight_decay=0.05))
    )
    first = make_first(first_model.parameters())
    _steps(first_model, first, LRS[:2])
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()}, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    second_model = _model()
    second_model.load_state_dict(saved["model"])
    second = make_second(second_model.parameters())
    second.load_state_dict(saved["optimizer"])
    generator_state = torch.Generator().manual_seed(1)
    for _ in range(2):  # the data of the first two steps, drawn again so the next two match the reference
        torch.randn(5, 6, generator=generator_state)
    for lr in LRS[2:]:
        for group in second.param_groups:
            group["lr"] = lr
        second.zero_grad(set_to_none=True)
        second_model(torch.randn(5, 6, generator=generator_state)).pow(2).mean().backward()
        second.step()
    for mine, expected in zip(second_model.parameters(), reference_model.parameters()):
        assert torch.equal(mine, expected)


def test_a_checkpoint_for_another_model_is_refused():
    optimizer = AdamW(_model().parameters(), lr=1e-3)
    other = AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="2 parameters"):
        optimizer.load_state_dict(other.state_dict())
