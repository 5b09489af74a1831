"""TD3 on Pendulum with polyak keeping the target actor and the target critics.

Run: python examples/td3_pendulum.py [--steps 8000] [--seeds 0 1 2]
Needs ``gymnasium`` (``pip install polyak[rl]``; Pendulum is built in, nothing is downloaded).

Fujimoto et al. 2018: twin critics, target policy smoothing, and a delayed actor. The targets are
``polyak.EMA(net, tau=0.005, target="copy")``, updated together with the actor (every second critic step),
so ``tau`` is per target update as in the paper. Prints, per seed, the mean return of 10 deterministic
evaluation episodes (Pendulum's returns are negative; about -150 is solved) and the mean over seeds.
"""

from __future__ import annotations

import argparse
import statistics

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import polyak


def mlp(inputs: int, outputs: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs)
    )


class Critic(nn.Module):
    """Two Q-functions of (observation, action)."""

    def __init__(self, observations: int, actions: int) -> None:
        super().__init__()
        self.q1, self.q2 = mlp(observations + actions, 1), mlp(observations + actions, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, action], 1)
        return self.q1(x).squeeze(1), self.q2(x).squeeze(1)


def evaluate(actor: nn.Module, scale: float, seed: int, episodes: int) -> float:
    env = gym.make("Pendulum-v1")
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=10_000 + 100 * seed + episode)
        total, finished = 0.0, False
        while not finished:
            with torch.no_grad():
                action = scale * actor(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0].numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            finished = terminated or truncated
        returns.append(total)
    return statistics.mean(returns)


def run(seed: int, steps: int = 8000, start: int = 1000, batch: int = 128, gamma: float = 0.99) -> dict[str, float]:
    """Train one TD3 agent; returns the mean return of deterministic evaluation episodes."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    env = gym.make("Pendulum-v1")
    observations, actions = env.observation_space.shape[0], env.action_space.shape[0]
    scale = float(env.action_space.high[0])
    actor = nn.Sequential(mlp(observations, actions), nn.Tanh())
    critic = Critic(observations, actions)
    actor_target = polyak.EMA(actor, tau=0.005, target="copy")
    critic_target = polyak.EMA(critic, tau=0.005, target="copy")
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=1e-3)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3)
    size = steps
    buffer = {
        "obs": np.zeros((size, observations), np.float32),
        "action": np.zeros((size, actions), np.float32),
        "reward": np.zeros(size, np.float32),
        "next_obs": np.zeros((size, observations), np.float32),
        "done": np.zeros(size, np.float32),
    }
    obs, _ = env.reset(seed=seed)
    for step in range(steps):
        if step < start:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = scale * actor(torch.as_tensor(obs).unsqueeze(0))[0].numpy()
            action = np.clip(action + rng.normal(0, 0.1 * scale, actions), -scale, scale).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(buffer, (obs, action, reward, next_obs, terminated), strict=True):
            buffer[key][step] = value
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
        if step < start:
            continue
        index = rng.integers(0, step + 1, batch)
        o, a, r, o2, d = (torch.from_numpy(buffer[key][index]) for key in buffer)
        with torch.no_grad():
            noise = (0.2 * torch.randn_like(a)).clamp(-0.5, 0.5)
            a2 = (scale * actor_target.target(o2) + noise * scale).clamp(-scale, scale)
            goal = r + gamma * (1 - d) * torch.min(*critic_target.target(o2, a2))  # the live target critics
        q1, q2 = critic(o, a)
        critic_loss = F.mse_loss(q1, goal) + F.mse_loss(q2, goal)
        critic_optimizer.zero_grad()
        critic_loss.backward()
        critic_optimizer.step()
        if step % 2 == 0:  # the delayed actor, and the soft target updates with it
            actor_loss = -critic(o, scale * actor(o))[0].mean()
            actor_optimizer.zero_grad()
            actor_loss.backward()
            actor_optimizer.step()
            actor_target.update()
            critic_target.update()
    return {"eval return": evaluate(actor, scale, seed, 10), "target updates": float(critic_target.num_updates)}


def main(steps: int = 8000, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[int, dict[str, float]]:
    torch.set_num_threads(1)
    results = {}
    for seed in seeds:
        results[seed] = run(seed, steps=steps)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[seed].items()), flush=True)
    returns = [r["eval return"] for r in results.values()]
    spread = statistics.stdev(returns) if len(returns) > 1 else 0.0
    print(f"eval return over {len(returns)} seeds: {statistics.mean(returns):.1f} ± {spread:.1f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    options = parser.parse_args()
    main(options.steps, tuple(options.seeds))
