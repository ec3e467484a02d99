"""OLMo 2 (OLMo et al. 2024, arXiv:2501.00656): norms after attention and after the MLP instead of before them,
RMSNorms over the whole query and key projections before RoPE, the rotated q and k rounded back to their dtype,
and RMSNorm's product with its weight rounded (not x_hat before it)."""

from posttrain.policies.families.adapter import Family, Norm

OLMO2 = Family(
    "olmo2", ("olmo2",), norm=Norm(round_before_weight=False), attention_in_norm=None,
    attention_out_norm="post_attention_layernorm", mlp_in_norm=None, mlp_out_norm="post_feedforward_layernorm",
    qk_norm="projection", rope_keeps_dtype=True,
)  # fmt: skip

ADAPTERS = (OLMO2,)
