"""One RL step's update on a fixed global batch, on however many ranks torchrun starts (or one process): writes
rank 0's parameters after the update to argv[1]. tests/trainers/test_distributed.py compares 1 and 2 ranks."""

import sys

import torch

from posttrain.objectives import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from posttrain.policies import FrozenCopy, build_model
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.runtime.distributed import init_ranks, sum_gradients
from posttrain.tasks import build_builtin_tokenizer
from posttrain.trainers.rl import Objectives, UpdateStats, prepare_step, update_minibatch

torch.manual_seed(0)
out, advantage = sys.argv[1], sys.argv[2]
ranks = init_ranks("cpu")
tokenizer = build_builtin_tokenizer("arithmetic")
policy = build_model("qwen2-tiny", tokenizer, seed=0)
reference = FrozenCopy(build_model("qwen2-tiny", tokenizer, seed=1))
prompts = [tokenizer(p).input_ids for p in ("2+2=", "13+5=", "7-3=", "40+2=")]
params = SamplingParams(max_new_tokens=5, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
rollouts = ENGINES["native"].generate(policy, prompts, params, n=4, generator=torch.Generator().manual_seed(0))
mine = slice(None) if not ranks.distributed else ranks.contiguous_share(len(prompts))
rows = range(len(prompts) * 4)[mine.start * 4 if mine.start is not None else None:
                              mine.stop * 4 if mine.stop is not None else None]  # fmt: skip
local = type(rollouts)(rollouts.prompt_ids[mine], [rollouts.completion_ids[i] for i in rows],
                       [rollouts.logprobs[i] for i in rows], [rollouts.finish_reasons[i] for i in rows],
                       group_size=4)  # fmt: skip
padded = local.to_padded(tokenizer.pad_token_id, "cpu")
rewards_PG = torch.tensor([float(len(c) % 3) for c in local.completion_ids])
objectives = Objectives(ADVANTAGES[advantage], POLICY_LOSSES["ppo"], AGGREGATIONS["token_mean"], KL_ESTIMATORS["k3"])
tensors, _ = prepare_step(padded, {"rewards_PG": rewards_PG, "group_size": 4}, objectives, advantage_args={},
                          reference=reference, critic=None, kl_coef=0.1, kl_in_reward=True, temperature=1.0,
                          micro_batch_size=None, ranks=ranks)  # fmt: skip
update_minibatch(policy, None, tensors, torch.arange(len(padded.loss_mask_B_T)), policy_loss=objectives.policy_loss,
                 policy_loss_args={}, aggregation=objectives.aggregation, kl_estimator=None, kl_coef_in_loss=0.0,
                 entropy_coef=0.01, value_coef=0.5, value_clip_range=0.2, temperature=1.0, max_len=5,
                 micro_batch_size=None, stats=UpdateStats(), ranks=ranks)  # fmt: skip
sum_gradients(list(policy.parameters()), ranks)
if ranks.main:
    torch.save({n: p.grad.clone() for n, p in policy.named_parameters()}, out)
