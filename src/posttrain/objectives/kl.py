"""Per-token estimators of KL(pi || ref) from tokens sampled from pi, and the adaptive KL coefficient.

Estimators are registered with `@kl_estimator(name)`, signature `fn(logp_B_T, ref_logp_B_T) -> [B, T]`:
logp_B_T are the sampled tokens' log-probs under the policy pi, ref_logp_B_T under the reference; one that
also names `old_logp_B_T` gets the sampling policy's (the loop passes inputs by name). They do not mask;
the loop masks and aggregates (in the loss) or subtracts coef * KL from the token rewards (in the reward).

All three follow Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html,
with x ~ pi and r = ref(x) / pi(x), so log r = ref_logp - logp:
    k1 = -log r                  unbiased, high variance, can be negative
    k2 = (log r)^2 / 2           biased, low variance, >= 0
    k3 = (r - 1) - log r         unbiased, low variance, >= 0

As *losses* (KL in the loss, on samples from pi = the policy at sampling time) their expected gradients
differ: k1's is zero, k2's is the gradient of KL(pi || ref), k3's that of KL(ref || pi). k1 belongs in
the reward; GRPO puts k3 in the loss. `k3_bias_corrected` (TRL 1.16's GRPO default) multiplies k3 by the
importance ratio pi / pi_old, whose gradient makes the loss's expected gradient KL(pi || ref)'s.
"""

from __future__ import annotations

from torch import Tensor

from posttrain.objectives.registry import kl_estimator

# exp(20) ~ 4.9e8 stays finite in float32 and bfloat16; verl's low_var_kl clamps log r at the same value.
_LOG_RATIO_LIMIT = 20.0


@kl_estimator("k1")
def k1(logp_B_T: Tensor, ref_logp_B_T: Tensor) -> Tensor:
    """k1 = -log r = logp - ref_logp (Schulman 2020, http://joschu.net/blog/kl-approx.html).

    Unbiased for KL(pi || ref) under x ~ pi. Shapes: [B, T] in, [B, T] out.
    Deviations: none.
    """
    return logp_B_T - ref_logp_B_T


@kl_estimator("k2")
def k2(logp_B_T: Tensor, ref_logp_B_T: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2 = (logp - ref_logp)^2 / 2 (Schulman 2020, http://joschu.net/blog/kl-approx.html).

    Biased (its expectation agrees with the KL to second order in the log-ratio), never negative.
    Shapes: [B, T] in, [B, T] out.
    Deviations: none.
    """
    return 0.5 * (logp_B_T - ref_logp_B_T).square()


@kl_estimator("k3")
def k3(logp_B_T: Tensor, ref_logp_B_T: Tensor) -> Tensor:
    """k3 = (r - 1) - log r, r = exp(ref_logp - logp) (Schulman 2020, http://joschu.net/blog/kl-approx.html).

    Unbiased and never negative (r - 1 >= log r); the estimator GRPO puts in its loss (arXiv:2402.03300).
    Shapes: [B, T] in, [B, T] out.
    Deviations: log r is clamped above at 20 so exp(log r) cannot overflow (the value and gradient change
    only where ref puts e^20 times more mass on the token than pi). verl also clamps the result to
    [-10, 10]; we do not.
    """
    log_r_B_T = (ref_logp_B_T - logp_B_T).clamp(max=_LOG_RATIO_LIMIT)
    return log_r_B_T.exp() - 1.0 - log_r_B_T


@kl_estimator("k3_bias_corrected")
def k3_bias_corrected(logp_B_T: Tensor, ref_logp_B_T: Tensor, old_logp_B_T: Tensor) -> Tensor:
    """k3 weighted by the importance ratio to the sampling policy: TRL 1.16's default GRPO KL term
    (`use_bias_correction_kl=True`, trl/trainer/grpo_trainer.py; DeepSeek-V3.2, arXiv:2512.02556).

        rho_t = exp(logp_t - old_logp_t)          (with gradient; old_logp: the sampling policy's log-probs)
        kl_t  = rho_t * k3_t

    The tokens come from pi_old; rho reweights them to pi, so E_old[rho * k3] = KL(pi || ref), and as a loss
    its gradient is KL(pi || ref)'s: at rho = 1 it is (logp - ref_logp) * grad logp, where plain k3's is
    (1 - r) * grad logp, the gradient of KL(ref || pi). Its value at rho = 1 (the KL in the reward, the
    logged KL) is k3's. Shapes: [B, T] in, [B, T] out.
    Deviations: k3's log r is clamped at 20 as in `k3` (TRL does not clamp); the ratio is always per token
    (TRL with importance_sampling_level="sequence" broadcasts the sequence's ratio onto its tokens).
    """
    return (logp_B_T - old_logp_B_T).exp() * k3(logp_B_T, ref_logp_B_T)


def adaptive_kl_coef(
    coef: float | Tensor, observed_kl: float | Tensor, *, target: float, horizon: float, n_steps: int
) -> float | Tensor:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv:1909.08593).

        e       = clip(KL_observed / KL_target - 1, -0.2, 0.2)
        beta'   = beta * (1 + K_beta * e)          K_beta = n_steps / horizon

    coef: the current beta; observed_kl: the step's mean KL per sequence (a float or 0-dim tensor);
    target: KL_target; horizon: the number of samples over which the error should decay; n_steps: the
    samples in this update (OpenRLHF's `AdaptiveKLController`, and TRL's before 1.16, parametrise K_beta this way;
    Ziegler et al. use K_beta = 0.1). Returns the new beta, of the type of the inputs. Pure: the caller
    keeps the coefficient.
    Deviations: none.
    """
    error = observed_kl / target - 1.0
    error = error.clamp(-0.2, 0.2) if isinstance(error, Tensor) else min(max(error, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
