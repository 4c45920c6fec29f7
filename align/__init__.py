"""align: instruction SFT, reward models from human rankings, DPO and PPO, in readable stages.

Entry points: `python -m align.sft | align.rm | align.dpo | align.ppo | align.pipeline | align.evaluate`.
"""

__version__ = "0.1.0"
