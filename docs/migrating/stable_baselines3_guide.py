"""Stable-Baselines3's polyak_update -> polyak: DQN's target network, kept by polyak with the same numbers."""

import gymnasium as gym
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback

import polyak

# --8<-- [start:side_by_side]
# SB3: DQN blends q_net into q_net_target with weight tau on every target_update_interval-th environment step
# (polyak_update: target <- (1 - tau) * target + tau * online); the target starts as a copy of q_net.
agent = DQN("MlpPolicy", gym.make("CartPole-v1"), tau=0.05, target_update_interval=4, learning_starts=50,
            train_freq=1, batch_size=32, policy_kwargs={"net_arch": [32]}, seed=0, device="cpu")

# polyak: a live target that starts as the model and blends from the first update (tau, not a copy),
# with the plain tau on every 4th step, not compensated for the 4 (compensate=False)
target = polyak.EMA(agent.q_net, tau=0.05, update_every=4, compensate=False, target="copy")


class UpdateTarget(BaseCallback):  # runs at every environment step, beside DQN's own target update
    def _on_step(self) -> bool:
        target.update(agent.q_net)
        return True


agent.learn(total_timesteps=400, callback=UpdateTarget())
# --8<-- [end:side_by_side]

# SB3 blends with foreach mul_ + add_ in float32, polyak with lerp: each rounds on its own (~6e-8 relative per
# update), so they agree to ~1e-6, and polyak lies nearer the float64 recurrence (tests/test_migrate_cadence.py)
theirs = agent.q_net_target.state_dict()
for (name, value), ours in zip(theirs.items(), target.target.state_dict().values(), strict=True):
    torch.testing.assert_close(ours, value, rtol=0, atol=1e-6, msg=name)
