"""Next-token selection: temperature, top-k, top-p, min-p and the sampling log-probs.

Order of the filters follows transformers' `generate` (temperature, top-k, top-p, min-p), so that the
native and the reference engine draw from the same distribution.

Log-prob convention: the log-prob recorded for a sampled token is

    log p(y_t) = log_softmax(logits / T)[y_t]          (T = 1 when greedy)

taken BEFORE top-k / top-p / min-p filtering. This is what PPO-style objectives use as the behaviour
("old") log-probs: the trainer recomputes log_softmax(logits / T) of the same tokens with a forward
pass (TRL's GRPO divides the logits by the sampling temperature and applies no filter; verl and vLLM's
default `logprobs` are likewise unfiltered), so sampling and training log-probs agree when the policy
has not moved. A filter truncates the sampling distribution; the recorded log-prob does not see it.
"""

import torch
from torch import Tensor

from posttrain.rollout.engine import SamplingParams


def scale_logits(logits_B_V: Tensor, temperature: float) -> Tensor:
    """Divide by the temperature in float32 (temperature 0 means greedy and leaves logits unscaled).

    logits_B_V: [B, V] raw logits. Returns [B, V] float32.
    """
    logits_B_V = logits_B_V.float()
    return logits_B_V if temperature in (0.0, 1.0) else logits_B_V / temperature


def filter_top_k(logits_B_V: Tensor, top_k: int) -> Tensor:
    """Keep the `top_k` largest logits per row (ties with the k-th are kept); 0 turns it off.

    logits_B_V: [B, V]. Returns [B, V] with the rest set to -inf.
    """
    if top_k <= 0 or top_k >= logits_B_V.shape[-1]:
        return logits_B_V
    kth_B_1 = torch.topk(logits_B_V, top_k, dim=-1).values[:, -1:]
    return logits_B_V.masked_fill(logits_B_V < kth_B_1, float("-inf"))


def filter_top_p(logits_B_V: Tensor, top_p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest top set whose probability reaches `top_p`.

    A token is kept when the probability mass of the tokens ranked above it is below `top_p`, so the
    most likely token is always kept. logits_B_V: [B, V]. Returns [B, V] with the rest set to -inf.
    """
    if top_p >= 1.0:
        return logits_B_V
    sorted_B_V, order_B_V = torch.sort(logits_B_V, dim=-1, descending=True)
    probs_B_V = sorted_B_V.softmax(dim=-1)
    mass_above_B_V = probs_B_V.cumsum(dim=-1) - probs_B_V
    drop_sorted_B_V = mass_above_B_V >= top_p
    drop_B_V = drop_sorted_B_V.scatter(-1, order_B_V, drop_sorted_B_V)
    return logits_B_V.masked_fill(drop_B_V, float("-inf"))


def filter_min_p(logits_B_V: Tensor, min_p: float) -> Tensor:
    """Min-p filter (Nguyen et al. 2024, arXiv:2407.01082): drop tokens with p < min_p * max p.

    logits_B_V: [B, V]. Returns [B, V] with the dropped tokens set to -inf.
    """
    if min_p <= 0.0:
        return logits_B_V
    probs_B_V = logits_B_V.softmax(dim=-1)
    threshold_B_1 = min_p * probs_B_V.amax(dim=-1, keepdim=True)
    return logits_B_V.masked_fill(probs_B_V < threshold_B_1, float("-inf"))


def filter_logits(scaled_B_V: Tensor, params: SamplingParams) -> Tensor:
    """Apply top-k, then top-p, then min-p to temperature-scaled logits. [B, V] -> [B, V]."""
    filtered_B_V = filter_top_k(scaled_B_V, params.top_k)
    filtered_B_V = filter_top_p(filtered_B_V, params.top_p)
    return filter_min_p(filtered_B_V, params.min_p)


def gather_logprobs(scaled_B_V: Tensor, tokens_B: Tensor) -> Tensor:
    """log_softmax(scaled logits)[token] per row. scaled_B_V: [B, V] float32; tokens_B: [B]. Returns [B]."""
    return scaled_B_V.log_softmax(dim=-1).gather(-1, tokens_B[:, None]).squeeze(-1)


def draw_from(probs_B_V: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row drawn from `probs_B_V` (non-negative rows with a positive sum) by inverting the row's
    cumulative distribution with one uniform draw:

        token = the first i with c_i > u,   c_i = p_0 + ... + p_i,   u = U * c_{V-1},   U ~ Uniform[0, 1)

    Token i is drawn when c_{i-1} <= u < c_i, with probability p_i / c_{V-1}; a token with p_i = 0 has
    c_i = c_{i-1} and is never drawn. The sums are float64, so that no token's probability moves (float32 sums
    over a 152k vocabulary would round a tail token's 1e-8 to 0 or 6e-8 beside a sum of 0.5). One draw per row,
    where the exponential race (argmax_i p_i / E_i) takes one per token, which on CPU were most of a decode step's
    sampling (bench/RESULTS.md, "sampling").
    Returns tokens_B (int64).
    """
    cdf_B_V = probs_B_V.double().cumsum(dim=-1)
    uniform_B_1 = torch.rand(len(cdf_B_V), 1, generator=generator, device=cdf_B_V.device, dtype=torch.float64)
    tokens_B = invert_cdf(cdf_B_V, uniform_B_1)
    # a row whose sums are NaN (NaN or all -inf logits) has no first sum above u: it gets index V
    no_distribution_B = tokens_B == cdf_B_V.shape[-1]
    if no_distribution_B.any():
        rows = no_distribution_B.nonzero().flatten().tolist()
        raise ValueError(
            f"sampling: rows {rows} have no next-token distribution (their probabilities hold NaN): the model's "
            "logits there are NaN or all -inf"
        )
    return tokens_B


def invert_cdf(cdf_B_V: Tensor, uniform_B_1: Tensor) -> Tensor:
    """The first index i of each row with cdf_B_V[i] > U * (the row's total), for U = uniform_B_1 in [0, 1).
    Returns [B] int64.

    U * total stays below total in float64 for every U up to 1 - 2^-53 (the largest `torch.rand` draws): the
    product is at least half a unit in the last place under total, so a row's last token of positive
    probability is always found."""
    u_B_1 = uniform_B_1 * cdf_B_V[:, -1:]
    return torch.searchsorted(cdf_B_V, u_B_1, right=True).squeeze(1)


def sample_tokens(
    logits_B_V: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick the next token of every row and its unfiltered sampling log-prob.

    logits_B_V: [B, V] raw next-token logits. `generator` must live on the logits' device.
    Returns tokens_B (int64) and logp_B (float32, log_softmax(logits / T) of the chosen token).
    """
    scaled_B_V = scale_logits(logits_B_V, params.temperature)
    if params.greedy:
        # max's indices are argmax's (the first maximum), at a fraction of its CPU time
        tokens_B = scaled_B_V.max(dim=-1).indices
    else:
        probs_B_V = filter_logits(scaled_B_V, params).softmax(dim=-1)
        tokens_B = draw_from(probs_B_V, generator)
    return tokens_B, gather_logprobs(scaled_B_V, tokens_B)
