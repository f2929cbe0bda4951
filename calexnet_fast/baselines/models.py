"""The published early-exit baselines' models, rebuilt on a frozen backbone (docs/design.md §1, BASELINES.md).

Every baseline attaches its own heads to the same branch points as CalexNet and keeps its own exit rule: a
sample leaves at the first branch whose **score** reaches one global threshold τ
(:func:`calexnet_fast.exit_rule.global_threshold_exit`), else it takes the backbone's prediction. Each model
has ``forward(features)``, ``loss(outputs, batch)`` (its training loss on a cached batch) and
``exit_outputs(outputs) -> ExitOutputs`` (the score and prediction of every exit).

* :class:`PTEEnet` (Lahiany & Aperstein 2022): exit block ``conv2`` = 2 × (3×3 conv + BN + ReLU) at the
  input width, global average pooling, a classifier and a sigmoid confidence head. EENet loss: cumulative
  prediction ``P_k = c_k p_k + (1 − c_k) P_{k+1}`` (``P_{K+1}`` = the backbone's softmax) with NLL on
  ``P_1`` plus ``λ`` × the cumulative expected cost ``C_1`` (λ = 1); targets = the backbone's argmax.
  Score = the confidence head ``c_k``.
* :class:`ZTW` (Zero Time Waste, Wołczyk et al. 2021): SDN heads (learned mix of max and average pooling
  to 4×4, linear), head ``k`` also reading head ``k−1``'s logits (detached, LayerNorm); CE on the labels
  averaged over heads. Second stage (heads fixed): per-level geometric ensembles
  :class:`GeometricEnsembles`. Score = max probability of the level-``k`` ensemble.
* :class:`BoostNet` (Yu et al. 2023): additive predictions ``F_k = out_k + r F_{k−1}`` (r = 0.5); head ``k``
  learns with ``CE(out_k + r · detach(F_{k−1}), y)``, summed over heads. Score = max softmax of ``F_k``.
  Heads: the CalexNet head (:class:`~calexnet_fast.heads.GridPrototypeHead` by default, same D, K), so the
  comparison with CalexNet isolates the training and the exit rule.

Choices this module fixes where the sources leave room (each a named option):

* BoostNet's training target uses the same ``r`` as inference (``out_k + r F_{k−1}`` is exactly ``F_k``
  with the earlier heads frozen); BASELINES.md writes the detached term without ``r``.
* PTEEnet's per-exit cost ``cost_k`` is the FLOPs of exiting at ``k`` including every earlier head (a failed
  head is paid for), divided by the backbone's FLOPs; ``C_{K+1}`` is the cost of running everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import GridPrototypeHead
from ..reference import working_map
from ..training import CachedBatch

__all__ = [
    "BoostNet",
    "ExitOutputs",
    "GeometricEnsembles",
    "PTEEnet",
    "PTEEnetExit",
    "SDNPool",
    "ZTW",
    "ZTWHead",
    "boosted_predictions",
    "cumulative_eenet",
]


def _check_max_size(max_size: int | None) -> None:
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
        raise ValueError(f"max_size: expected None or a positive int (pooled map side), got {max_size!r}")


class ExitOutputs(NamedTuple):
    """What a baseline's exit rule needs, for every exit and every sample.

    Attributes:
        scores: [K, N] float32, the score compared with the global threshold at exit ``k``.
        preds: [K, N] int64, the class predicted by a sample leaving at exit ``k``.
    """

    scores: torch.Tensor
    preds: torch.Tensor


# --------------------------------------------------------------------------------------------------
# PTEEnet
# --------------------------------------------------------------------------------------------------


class PTEEnetExit(nn.Module):
    """PTEEnet exit block: ``n_convs`` × (3×3 conv + BN + ReLU) at the input width, global average pool, a
    classifier and a sigmoid confidence head.

    Args:
        in_channels: C of the branch feature map.
        n_classes: classifier outputs.
        n_convs: 0 (``bnpool``-like plain pooling) to 3; the PTEEnet default ``conv2`` is 2.
        max_size: average-pool the map to at most ``max_size`` x ``max_size`` first
            (:func:`~calexnet_fast.reference.working_map`; ``None``: the full map, as PTEEnet does).

    ``forward(f [N, C, H, W]) -> (logits [N, n_classes], confidence [N] in (0, 1))``.
    """

    def __init__(self, in_channels: int, n_classes: int, n_convs: int = 2, max_size: int | None = None) -> None:
        super().__init__()
        _check_max_size(max_size)
        self.max_size = max_size
        if not isinstance(n_convs, int) or not 0 <= n_convs <= 3:
            raise ValueError(f"n_convs: expected 0, 1, 2 or 3 (PTEEnet plain/conv/conv2/conv3), got {n_convs!r}")
        layers: list[nn.Module] = []
        for _ in range(n_convs):
            layers += [
                nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, n_classes)
        self.confidence = nn.Linear(in_channels, 1)
        self.in_channels, self.n_classes, self.n_convs = in_channels, n_classes, n_convs

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_size is not None:
            f = working_map(f, self.max_size)
        h = self.body(f).mean(dim=(2, 3))
        return self.classifier(h), torch.sigmoid(self.confidence(h)).squeeze(1)


def cumulative_eenet(
    probs: torch.Tensor,
    conf: torch.Tensor,
    final_probs: torch.Tensor,
    costs: Sequence[float] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EENet's cumulative prediction and cost, from the last exit backwards.

    ``P_k = c_k p_k + (1 − c_k) P_{k+1}``, ``C_k = c_k cost_k + (1 − c_k) C_{k+1}``, with
    ``P_{K+1}`` = ``final_probs`` and ``C_{K+1}`` = ``costs[K]``.

    Args:
        probs: [K, B, C] class probabilities of the exits.
        conf: [K, B] confidences in [0, 1].
        final_probs: [B, C] the prediction of the network's end (the backbone's softmax).
        costs: K + 1 costs (exits 1..K, then running everything).

    Returns:
        P_1 [B, C] and C_1 [B].
    """
    k_count = probs.shape[0]
    costs = torch.as_tensor(costs, dtype=probs.dtype, device=probs.device)
    if costs.numel() != k_count + 1:
        raise ValueError(f"costs: expected K + 1 = {k_count + 1} values, got {costs.numel()}")
    p = final_probs
    c = costs[k_count].expand(probs.shape[1])
    for k in range(k_count - 1, -1, -1):
        ck = conf[k].unsqueeze(1)
        p = ck * probs[k] + (1 - ck) * p
        c = conf[k] * costs[k] + (1 - conf[k]) * c
    return p, c


class PTEEnet(nn.Module):
    """Post-trained early exits with EENet's cumulative loss (see the module docstring).

    Args:
        branch_channels: K channel counts of the branch feature maps.
        n_classes: number of classes.
        exit_costs: K + 1 costs (exit 1..K, then everything) relative to the backbone alone; default
            ``(k / (K + 1))`` for the exits and 1 for the end (set the real ones with
            :meth:`set_exit_costs` once the heads' FLOPs are known; :func:`train_baseline` does).
        n_convs: exit block depth (2 = ``conv2``).
        cost_weight: λ of the cost term (1).
        target: ``"backbone"`` (argmax of the backbone's logits, PTEEnet's ``use_main_targets``) or
            ``"labels"``.
        max_size: exit blocks read the map average-pooled to at most this side (:class:`PTEEnetExit`).

    ``forward(features) -> (logits [K, B, C], confidence [K, B])``.
    """

    def __init__(
        self,
        branch_channels: Sequence[int],
        n_classes: int,
        exit_costs: Sequence[float] | None = None,
        n_convs: int = 2,
        cost_weight: float = 1.0,
        target: str = "backbone",
        max_size: int | None = None,
    ) -> None:
        super().__init__()
        if target not in ("backbone", "labels"):
            raise ValueError(f"target: expected 'backbone' or 'labels', got {target!r}")
        k_count = len(branch_channels)
        self.heads = nn.ModuleList(PTEEnetExit(int(c), n_classes, n_convs, max_size) for c in branch_channels)
        self.cost_weight = float(cost_weight)
        self.target = target
        default = [(k + 1) / (k_count + 1) for k in range(k_count)] + [1.0]
        self.register_buffer("exit_costs", torch.tensor(default, dtype=torch.float32))
        if exit_costs is not None:
            self.set_exit_costs(exit_costs)

    def set_exit_costs(self, exit_costs: Sequence[float]) -> None:
        """K + 1 relative costs (exits 1..K, then everything)."""
        c = torch.as_tensor(list(exit_costs), dtype=torch.float32)
        if c.numel() != len(self.heads) + 1 or not torch.isfinite(c).all() or (c < 0).any():
            raise ValueError(f"exit_costs: expected {len(self.heads) + 1} finite non-negative costs, got {c.tolist()}")
        self.exit_costs = c.to(self.exit_costs.device)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [h(f) for h, f in zip(self.heads, features, strict=True)]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: CachedBatch) -> torch.Tensor:
        """``NLL(P_1, target) + λ mean(C_1)``."""
        logits, conf = outputs
        zb = batch.backbone_logits.float()
        target = zb.argmax(1) if self.target == "backbone" else batch.labels
        p1, c1 = cumulative_eenet(
            torch.softmax(logits.float(), -1), conf.float(), torch.softmax(zb, 1), self.exit_costs
        )
        nll = F.nll_loss(torch.log(p1.clamp_min(1e-12)), target)
        return nll + self.cost_weight * c1.mean()

    def exit_outputs(self, outputs: tuple[torch.Tensor, torch.Tensor]) -> ExitOutputs:
        logits, conf = outputs
        return ExitOutputs(conf.float(), logits.argmax(-1))


# --------------------------------------------------------------------------------------------------
# ZTW
# --------------------------------------------------------------------------------------------------


class SDNPool(nn.Module):
    """SDN pooling: ``a · maxpool + (1 − a) · avgpool`` to ``size × size``, ``a = sigmoid(α)`` learned."""

    def __init__(self, size: int = 4) -> None:
        super().__init__()
        self.size = size
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.alpha)
        return a * F.adaptive_max_pool2d(f, self.size) + (1 - a) * F.adaptive_avg_pool2d(f, self.size)


class ZTWHead(nn.Module):
    """A ZTW internal classifier: SDN pooling to 4×4, flatten, linear; optionally cascading.

    Args:
        in_channels: C of the branch feature map.
        n_classes: number of classes.
        cascading: also read the previous head's logits (detached, LayerNorm) before the linear layer.
        pool_size: side of the pooled map (4).
        max_size: average-pool the map to at most ``max_size`` x ``max_size`` first
            (:func:`~calexnet_fast.reference.working_map`), so the SDN max pooling takes the maximum of local
            means; ``None``: the full map, as SDN does.

    ``forward(f [N, C, H, W], prev [N, n_classes] | None) -> logits [N, n_classes]``; a cascading head
    without ``prev`` reads zeros (used for FLOPs probing).
    """

    def __init__(
        self, in_channels: int, n_classes: int, cascading: bool, pool_size: int = 4, max_size: int | None = None
    ) -> None:
        super().__init__()
        _check_max_size(max_size)
        self.max_size = max_size
        self.pool = SDNPool(pool_size)
        self.cascading = cascading
        self.norm = nn.LayerNorm(n_classes) if cascading else None
        self.linear = nn.Linear(in_channels * pool_size * pool_size + (n_classes if cascading else 0), n_classes)
        self.n_classes = n_classes

    def forward(self, f: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        if self.max_size is not None:
            f = working_map(f, self.max_size)
        h = self.pool(f).flatten(1)
        if self.cascading:
            if prev is None:
                prev = h.new_zeros(h.shape[0], self.n_classes)
            h = torch.cat([h, self.norm(prev.detach())], dim=1)
        return self.linear(h)


class ZTW(nn.Module):
    """Zero Time Waste internal classifiers (stage 1) plus their geometric ensembles (stage 2).

    Args:
        branch_channels: K channel counts.
        n_classes: number of classes.
        cascading: heads 2..K read the previous head's logits (ZTW's cascade connection).
        max_size: heads read the map average-pooled to at most this side (:class:`ZTWHead`).

    ``forward(features) -> logits [K, B, C]`` of the internal classifiers.
    """

    def __init__(
        self, branch_channels: Sequence[int], n_classes: int, cascading: bool = True, max_size: int | None = None
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            ZTWHead(int(c), n_classes, cascading=cascading and k > 0, max_size=max_size)
            for k, c in enumerate(branch_channels)
        )
        self.ensembles = GeometricEnsembles(len(branch_channels), n_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        zs: list[torch.Tensor] = []
        for head, f in zip(self.heads, features, strict=True):
            zs.append(head(f, zs[-1] if zs else None))
        return torch.stack(zs)

    def loss(self, outputs: torch.Tensor, batch: CachedBatch) -> torch.Tensor:
        """Cross-entropy on the labels, averaged over the K heads."""
        k_count, b, c = outputs.shape
        y = batch.labels.repeat(k_count)
        return F.cross_entropy(outputs.float().reshape(k_count * b, c), y)

    def exit_outputs(self, outputs: torch.Tensor) -> ExitOutputs:
        logq = self.ensembles(outputs.float())
        conf, pred = logq.exp().max(dim=-1)
        return ExitOutputs(conf, pred)


class GeometricEnsembles(nn.Module):
    """ZTW's per-level geometric ensembles: ``log q_k ∝ mean_{i≤k}(exp(w_{k,i}) log_softmax(z_i)) + b_k``.

    Args:
        n_levels: K.
        n_classes: number of classes.
        init_std: std of the ``w`` initialisation (ZTW: 0.01); ``b`` starts at 0.

    ``forward(logits [K, B, C]) -> log q [K, B, C]`` (normalised log-probabilities of every level).
    """

    def __init__(self, n_levels: int, n_classes: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(k + 1) * init_std) for k in range(n_levels))
        self.bias = nn.Parameter(torch.zeros(n_levels, n_classes))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3 or logits.shape[0] != len(self.weights):
            raise ValueError(
                f"logits: expected [K={len(self.weights)}, B, C] internal-classifier logits, got {list(logits.shape)}"
            )
        lp = F.log_softmax(logits.float(), dim=-1)
        levels = []
        for k, w in enumerate(self.weights):
            mix = (w.exp().view(-1, 1, 1) * lp[: k + 1]).mean(0) + self.bias[k]
            levels.append(F.log_softmax(mix, dim=-1))
        return torch.stack(levels)

    def loss(self, logq: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the labels, averaged over the levels."""
        k_count, b, c = logq.shape
        return F.nll_loss(logq.reshape(k_count * b, c), labels.repeat(k_count))


# --------------------------------------------------------------------------------------------------
# BoostNet
# --------------------------------------------------------------------------------------------------


def boosted_predictions(outputs: torch.Tensor, r: float = 0.5, detach_prefix: bool = False) -> torch.Tensor:
    """BoostNet's additive predictions ``F_k = out_k + r · F_{k−1}`` (``F_0 = 0``).

    Args:
        outputs: [K, B, C] raw head outputs.
        r: shrinkage of the earlier ensemble (0.5).
        detach_prefix: compute ``F_k = out_k + r · detach(F_{k−1})`` (the training form: head ``k`` learns
            the residual of the fixed ensemble before it).

    Returns:
        [K, B, C].
    """
    fs: list[torch.Tensor] = []
    prev = None
    for k in range(outputs.shape[0]):
        fk = outputs[k] if prev is None else outputs[k] + r * (prev.detach() if detach_prefix else prev)
        fs.append(fk)
        prev = fk
    return torch.stack(fs)


class BoostNet(nn.Module):
    """Boosted heads on a frozen backbone (see the module docstring).

    Args:
        branch_channels: K channel counts.
        n_classes: number of classes.
        r: shrinkage (0.5).
        head_dim, n_prototypes: D and K of the heads.
        target: ``"labels"`` (BoostNet) or ``"backbone"`` (argmax of the backbone).
        head: the CalexNet head class: :class:`~calexnet_fast.heads.GridPrototypeHead` (default) or
            :class:`~calexnet_fast.heads.PrototypePoolingHead`.

    ``forward(features) -> raw outputs [K, B, C]`` (``out_k``; :func:`boosted_predictions` makes ``F_k``).
    """

    def __init__(
        self,
        branch_channels: Sequence[int],
        n_classes: int,
        r: float = 0.5,
        head_dim: int = 32,
        n_prototypes: int = 32,
        target: str = "labels",
        head: type[nn.Module] = GridPrototypeHead,
    ) -> None:
        super().__init__()
        if target not in ("backbone", "labels"):
            raise ValueError(f"target: expected 'backbone' or 'labels', got {target!r}")
        self.heads = nn.ModuleList(
            head(int(c), n_classes, dim=head_dim, n_prototypes=n_prototypes) for c in branch_channels
        )
        self.r = float(r)
        self.target = target

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([h(f) for h, f in zip(self.heads, features, strict=True)])

    def loss(self, outputs: torch.Tensor, batch: CachedBatch) -> torch.Tensor:
        """``Σ_k CE(out_k + r · detach(F_{k−1}), y)``."""
        fs = boosted_predictions(outputs.float(), self.r, detach_prefix=True)
        k_count, b, c = fs.shape
        y = batch.labels if self.target == "labels" else batch.backbone_logits.argmax(1)
        return F.cross_entropy(fs.reshape(k_count * b, c), y.repeat(k_count)) * k_count

    def exit_outputs(self, outputs: torch.Tensor) -> ExitOutputs:
        conf, pred = torch.softmax(boosted_predictions(outputs.float(), self.r), dim=-1).max(dim=-1)
        return ExitOutputs(conf, pred)
