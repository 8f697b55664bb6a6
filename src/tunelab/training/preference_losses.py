"""The preference losses of the dpo stage (sigmoid, hinge, ipo, orpo, simpo) and the kto stage, as pure functions.

    losses = dpo_sigmoid_loss(chosen_logratios, rejected_logratios, beta=0.1)   # [batch]: one loss per pair
    losses = simpo_loss(chosen_logps, rejected_logps, beta=2.0, gamma=0.5)

Every function takes per-sequence log-probabilities of the reply tokens (`logprobs.sequence_logprobs`) and returns
one loss per sample; the trainer averages them. The losses that compare with a reference model (`REFERENCE_LOSSES`
in the schema: sigmoid, hinge, ipo) take log-ratios, policy minus reference; orpo and simpo take the policy's
log-probabilities alone. With either, `beta * argument` is the sample's implicit reward, which the trainers log.

`AVERAGED_LOSSES` are computed from log-probabilities averaged over the reply's tokens, the others from their sums,
as each loss's paper (and TRL and LLaMA-Factory) defines it.
"""

import torch
import torch.nn.functional as F

#: Losses defined on per-token average log-probabilities rather than sums over the reply.
AVERAGED_LOSSES = ("ipo", "orpo", "simpo")


def dpo_sigmoid_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), with cDPO's label smoothing eps (Mitchell 2023):

        d = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
        loss = -(1 - eps) * logsigmoid(beta * d) - eps * logsigmoid(-beta * d)

    eps is the assumed share of pairs whose preference label is flipped.
    """
    margin = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


def dpo_hinge_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """The hinge loss of SLiC (Zhao et al. 2023, arXiv:2305.10425) on DPO's log-ratio difference d:

        loss = relu(1 - beta * d)
    """
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036): regress d onto a fixed target instead of pushing it to infinity.

        loss = (d - 1 / (2 * beta))^2       with d from per-token average log-probabilities
    """
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, arXiv:2403.07691): SFT on the chosen reply plus lambda (= beta) times an odds ratio.

        log_odds = (pc - pr) - (log(1 - exp(pc)) - log(1 - exp(pr)))      pc, pr: average log-probabilities
        loss = -pc + beta * -logsigmoid(log_odds)
    """
    # log(1 - exp(x)) written as log(-expm1(x)): exact to the last bit when x is close to 0 (a likely reply).
    log_odds = (chosen_logps - rejected_logps) - (torch.log(-torch.expm1(chosen_logps))
                                                  - torch.log(-torch.expm1(rejected_logps)))
    return -chosen_logps - beta * F.logsigmoid(log_odds)


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734): no reference; the average log-probability is the reward, and the
    chosen one must beat the rejected one by a margin gamma.

        loss = -logsigmoid(beta * (pc - pr) - gamma)        pc, pr: average log-probabilities
    """
    return -F.logsigmoid(beta * (chosen_logps - rejected_logps) - gamma)


def kto_loss(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             chosen_weight: float = 1.0, rejected_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306): each reply alone, judged against a reference point, the KL
    estimate z0 (clamped at 0 and not trained through):

        desirable:    chosen_weight   * (1 - sigmoid(beta * (logratio - z0)))
        undesirable:  rejected_weight * (1 - sigmoid(beta * (z0 - logratio)))

    `logratios` are summed log-probabilities of the policy minus the reference's, `desirable` a bool per sample.
    """
    kl = kl.detach().clamp(min=0)
    chosen = chosen_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected = rejected_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, chosen, rejected)
