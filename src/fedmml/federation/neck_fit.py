"""Function-preserving necks (``model.neck_init = "fit"``): when a stage's new blocks change a CNN encoder's
width, its norm and neck must be rebuilt, and a fresh random neck takes from the heads the input they were
trained on. Instead, the new neck is fitted by least squares so that, on the clients' data, it gives what the
previous stage's neck gave: ``new_neck(new_norm(pool(h_new))) ~ old_neck(old_norm(pool(h_old)))``.

The fit is federated and exact: each client sends the sums ``X^T X`` and ``X^T Y`` over (up to
``model.neck_fit_samples`` of) its training samples, with X the new pooled-and-normed feature plus a constant
1 and Y the previous stage's output; the server adds them up and solves one ridge-regularised system, the same
solution one machine holding every client's samples would find. Data never leaves a client, only these sums
(a few hundred KB per encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedmml.config import Config
from fedmml.models.multimodal import MultimodalModel
from fedmml.models.staged import StagedEncoder

PREVIOUS = "previous."  # prefix of the previous stage's norm and neck tensors in a fit message
RIDGE = 1e-4  # of the mean diagonal of X^T X: keeps the system solvable with fewer samples than features


def enabled(cfg: Config) -> bool:
    """Whether a run fits the necks its growth rebuilds: always with ``model.neck_init = "fit"``, never with
    "fresh", and with "auto" (the default) for Prog only. Prog retrains the whole encoder and gained from the
    fit on each of three paired seeds (uniform schedule, emoji: +22.6, +9.3 and +53.8 validation rsum); LW
    did not (one seed, -8.0), and the fit costs a download of the model at every widening, the kind of cost
    LW exists to save (benchmarks/RESULTS.md, "Why Prog trails")."""
    mode = cfg.model.neck_init
    # Under client-level privacy "auto" is "fresh": the fit's sums would leave the clients without noise.
    return mode == "fit" or (mode == "auto" and cfg.run.method == "prog" and not cfg.privacy.enabled)


@dataclass
class NeckFit:
    """The necks a round must fit: {modality: depth of the last trained neck} and that neck and its norm, as
    tensors named for a message."""

    depths: dict[str, int] = field(default_factory=dict)
    previous: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, model: MultimodalModel, depth: dict[str, int]) -> None:
        """Before ``model`` grows to ``depth``: keep the norm and neck of each necked encoder whose width
        the growth changes, unless an earlier growth without training already kept its trained ones."""
        for modality, new_depth in depth.items():
            encoder = model.encoders[modality]
            if encoder.neck_dim is None or encoder.width_at(new_depth) == encoder.width:
                continue
            if modality in self.depths:
                continue
            self.depths[modality] = encoder.depth
            for part in ("norm", "neck"):
                for name, tensor in getattr(encoder, part).state_dict().items():
                    self.previous[f"{PREVIOUS}{modality}.{part}.{name}"] = tensor.detach().clone()


def _previous_modules(
    encoder: StagedEncoder, modality: str, depth: int, tensors: dict[str, torch.Tensor]
) -> tuple[torch.nn.Module, torch.nn.Module]:
    norm, neck = encoder.fresh_norm_and_neck(depth)
    for part, module in (("norm", norm), ("neck", neck)):
        prefix = f"{PREVIOUS}{modality}.{part}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    ref = next(encoder.parameters())
    return norm.to(ref.device).eval(), neck.to(ref.device).eval()


@torch.no_grad()
def statistics(
    model: MultimodalModel,
    loader: DataLoader,
    previous: dict[str, int],
    tensors: dict[str, torch.Tensor],
    limit: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """A client's sums for each encoder of ``previous`` ({modality: depth before growth}) over its first
    ``limit`` training samples, in float64: ``<m>.xtx`` [w+1, w+1], ``<m>.xty`` [w+1, d], ``<m>.yy`` (sum of
    squared targets, for the fit's R^2); and the number of samples. Frozen statistics: eval mode."""
    was_training = model.training
    model.eval()
    olds = {m: _previous_modules(model.encoders[m], m, d, tensors) for m, d in previous.items()}
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    for batch in loader:
        take = min(len(batch["index"]), limit - seen)
        if take <= 0:
            break
        for modality, old_depth in previous.items():
            encoder = model.encoders[modality]
            hidden, context = encoder.forward_prefix(model.inputs(modality, batch[modality]), old_depth)
            old_norm, old_neck = olds[modality]
            y = old_neck(old_norm(encoder.pool(hidden, context)))[:take].double()
            for block in list(encoder.blocks)[old_depth:]:
                hidden = encoder.run_block(block, hidden, context)
            x = encoder.norm(encoder.pool(hidden, context))[:take].double()
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
            for name, value in (("xtx", x.T @ x), ("xty", x.T @ y), ("yy", (y * y).sum())):
                key = f"{modality}.{name}"
                sums[key] = sums[key] + value.cpu() if key in sums else value.cpu()
        seen += take
    model.train(was_training)
    return sums, seen


def solve(model: MultimodalModel, sums: dict[str, torch.Tensor], samples: int) -> dict[str, Any]:
    """Set each fitted encoder's neck from the clients' summed statistics; return, per modality, the fit's
    R^2 on those samples (1: the new neck reproduces the previous output exactly)."""
    report = {}
    for modality in sorted({k.split(".")[0] for k in sums}):
        xtx, xty, yy = (sums[f"{modality}.{n}"] for n in ("xtx", "xty", "yy"))
        width = xtx.shape[0] - 1
        ridge = RIDGE * torch.diagonal(xtx)[:width].mean().clamp_min(1e-12)
        regular = xtx.clone()
        regular[range(width), range(width)] += ridge  # the bias column is not shrunk
        weights = torch.linalg.solve(regular, xty)  # [w+1, d]
        neck = model.encoders[modality].neck
        with torch.no_grad():
            neck.weight.copy_(weights[:width].T.to(neck.weight.dtype))
            neck.bias.copy_(weights[width].to(neck.bias.dtype))
        # Residual and total sums of squares from the same sums: no sample needed.
        residual = yy - 2 * (weights * xty).sum() + (weights * (xtx @ weights)).sum()
        mean = xty[width] / max(samples, 1)  # the bias row of X^T Y is the sum of the targets
        total = yy - samples * (mean * mean).sum()
        report[modality] = {"r2": float(1 - residual / total) if total > 0 else 0.0, "width": width}
    return report
