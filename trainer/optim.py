"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), torch.optim.AdamW's
update without torch.optim.

Building any torch.optim optimizer imports torch's compiler stack (torch._dynamo) on first use: 2 to 3 s
of CPU in every process that trains, each sweep's trial workers and every `plan` and `launch` (whose
estimate times a training step) included, for models that are never compiled on CPU. This class runs
the same update through the same kernel as `torch.optim.AdamW(fused=True)`, `torch._fused_adamw_`, on
CPU and CUDA, and the same elementwise single-tensor update elsewhere. Its state_dict has torch.optim's
layout, so checkpoints written with either load into the other. tests/test_optim.py checks both paths
against torch.optim.AdamW, step for step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")  # where torch has the fused AdamW kernel


class AdamW:
    """AdamW over `params` with one parameter group; `param_groups[0]["lr"]` may be changed between
    steps (the trainer's warm-up does)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool | None = None) -> None:
        self.params = list(params)
        if fused is None:
            fused = all(p.device.type in FUSED_DEVICES for p in self.params)
        self.fused = fused
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}]
        # Per parameter, as torch keeps them: the step count (a float tensor: on the parameter's device
        # for the fused kernel, on the CPU otherwise) and the two moment estimates.
        self.state: list[dict[str, torch.Tensor]] = [
            {"step": torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu"),
             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            for p in self.params
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        active = [(p, s) for p, s in zip(self.params, self.state) if p.grad is not None]
        if self.fused:
            self._fused_step(active, lr, beta1, beta2, eps, decay)
            return
        for p, s in active:  # torch's single-tensor AdamW, written out
            s["step"] += 1
            t = float(s["step"])
            p.mul_(1 - lr * decay)  # decoupled weight decay
            s["exp_avg"].lerp_(p.grad, 1 - beta1)
            s["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (s["exp_avg_sq"].sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
            p.addcdiv_(s["exp_avg"], denom, value=-lr / (1 - beta1**t))

    @staticmethod
    def _fused_step(active: list, lr: float, beta1: float, beta2: float, eps: float, decay: float) -> None:
        groups: dict[tuple, list] = {}  # the kernel takes tensors of one device and dtype at a time
        for p, s in active:
            groups.setdefault((p.device, p.dtype), []).append((p, s))
        for members in groups.values():
            params = [p for p, _ in members]
            states = [s for _, s in members]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                params, [p.grad for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [], steps,
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=decay, eps=eps, amsgrad=False, maximize=False,
            )

    # -- checkpoints, in torch.optim's layout -----------------------------------------------------
    def state_dict(self) -> dict:
        group = {**self.param_groups[0], "amsgrad": False, "maximize": False, "fused": self.fused,
                 "params": list(range(len(self.params)))}
        return {"state": {i: dict(s) for i, s in enumerate(self.state)}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state for {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} groups; this model has {len(self.params)} in one")
        saved = groups[0]
        self.param_groups[0].update({k: saved[k] for k in ("lr", "betas", "eps", "weight_decay") if k in saved})
        self.param_groups[0]["betas"] = tuple(self.param_groups[0]["betas"])
        for index, (p, mine) in zip(saved["params"], zip(self.params, self.state)):
            theirs = state_dict["state"].get(index) or state_dict["state"].get(str(index))
            if theirs is None:  # a parameter that had no gradient yet: its state starts at zero
                continue
            mine["step"] = theirs["step"].to(dtype=torch.float32, device=mine["step"].device).reshape(())
            for key in ("exp_avg", "exp_avg_sq"):
                mine[key] = theirs[key].to(device=p.device, dtype=p.dtype)
