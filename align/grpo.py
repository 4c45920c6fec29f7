"""The group-baseline family (GRPO, Dr.GRPO, DAPO, GSPO, RLOO, REINFORCE++) on PPO's loop.

    python -m align.grpo recipes/tiny/grpo.yaml [key=value ...]
    accelerate launch --num_processes 2 -m align.grpo RECIPE.yaml

This is align/ppo.py's loop, one code path: only the defaults differ (align/config.py: GRPOConfig and
grpo_algorithm: algorithm.advantage=grpo, the k3 KL in the loss, rollout.n=8, no critic). Every align.ppo setting
works here, and `algorithm.advantage=gae` in either gives PPO with a critic. Read the loop in align/ppo.py.
"""

from .config import GRPOConfig, run_cli
from .ppo import main

if __name__ == "__main__":
    run_cli(GRPOConfig, main, "python -m align.grpo")
