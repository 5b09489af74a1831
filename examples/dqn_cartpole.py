"""DQN on CartPole with polyak keeping the target network.

Run: python examples/dqn_cartpole.py [--steps 30000] [--seeds 0 1 2] [--tau 1.0 --target-every 500]
Needs ``gymnasium`` (``pip install polyak[rl]``; CartPole is built in, nothing is downloaded).

The target network is ``polyak.EMA(q, tau=1.0, update_every=500, target="copy")``: a live copy of the Q-network
that is overwritten every 500 optimizer steps (Mnih et al. 2015's hard update). ``--tau 0.005 --target-every 1``
gives the soft update of later DQN variants instead. Prints, per seed, the mean return of the last 20 training
episodes and of 20 greedy evaluation episodes (500 is the most CartPole-v1 allows).
"""

from __future__ import annotations

import argparse
import statistics

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import polyak


def q_network(observations: int, actions: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(observations, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, actions)
    )


class Replay:
    """A ring buffer of transitions (numpy arrays)."""

    def __init__(self, size: int, observations: int, seed: int) -> None:
        self.obs = np.zeros((size, observations), np.float32)
        self.next_obs = np.zeros((size, observations), np.float32)
        self.action = np.zeros(size, np.int64)
        self.reward = np.zeros(size, np.float32)
        self.done = np.zeros(size, np.float32)
        self.size, self.count, self.rng = size, 0, np.random.default_rng(seed)

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, done: bool) -> None:
        i = self.count % self.size
        self.obs[i], self.action[i], self.reward[i], self.next_obs[i], self.done[i] = (
            obs,
            action,
            reward,
            next_obs,
            done,
        )
        self.count += 1

    def sample(self, batch: int) -> tuple[torch.Tensor, ...]:
        index = self.rng.integers(0, min(self.count, self.size), batch)
        arrays = (self.obs, self.action, self.reward, self.next_obs, self.done)
        return tuple(torch.from_numpy(a[index]) for a in arrays)


def greedy_return(q: nn.Module, seed: int, episodes: int) -> float:
    env = gym.make("CartPole-v1")
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=10_000 + seed * 100 + episode)
        total, finished = 0.0, False
        while not finished:
            with torch.no_grad():
                action = int(q(torch.as_tensor(obs).unsqueeze(0)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            finished = terminated or truncated
        returns.append(total)
    return statistics.mean(returns)


def run(
    seed: int,
    steps: int = 30_000,
    tau: float = 1.0,
    target_every: int = 500,
    learning_starts: int = 1000,
    batch: int = 64,
    gamma: float = 0.99,
    eval_episodes: int = 20,
) -> dict[str, float]:
    """Train one DQN agent; returns the mean return of its last 20 training episodes and of greedy evaluation."""
    torch.manual_seed(seed)
    env = gym.make("CartPole-v1")
    observations, actions = env.observation_space.shape[0], int(env.action_space.n)
    q = q_network(observations, actions)
    target = polyak.EMA(q, tau=tau, update_every=target_every, target="copy")  # the target network
    optimizer = torch.optim.Adam(q.parameters(), lr=5e-4)
    replay = Replay(50_000, observations, seed)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    episode_returns, episode_return = [], 0.0
    explore_steps = max(1, steps // 3)
    for step in range(steps):
        epsilon = max(0.05, 1.0 - 0.95 * step / explore_steps)
        if rng.random() < epsilon:
            action = int(rng.integers(actions))
        else:
            with torch.no_grad():
                action = int(q(torch.as_tensor(obs).unsqueeze(0)).argmax())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        replay.add(obs, action, float(reward), next_obs, terminated)
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            episode_returns.append(episode_return)
            episode_return = 0.0
            obs, _ = env.reset()
        if step >= learning_starts:
            o, a, r, o2, d = replay.sample(batch)
            with torch.no_grad():
                next_value = target.target(o2).max(1).values  # the live target network
                goal = r + gamma * (1.0 - d) * next_value
            value = q(o).gather(1, a.unsqueeze(1)).squeeze(1)
            loss = nn.functional.smooth_l1_loss(value, goal)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(q.parameters(), 10.0)
            optimizer.step()
            target.update()  # hard copy every target_every steps (or a soft update with tau < 1)
    last = episode_returns[-20:] or [episode_return]
    return {
        "train return (last 20 episodes)": statistics.mean(last),
        "greedy return": greedy_return(q, seed, eval_episodes),
        "episodes": float(len(episode_returns)),
        "target updates": float(target.num_updates),
    }


def main(
    steps: int = 30_000, seeds: tuple[int, ...] = (0, 1, 2), tau: float = 1.0, target_every: int = 500
) -> dict[int, dict[str, float]]:
    torch.set_num_threads(1)
    results = {}
    for seed in seeds:
        results[seed] = run(seed, steps=steps, tau=tau, target_every=target_every)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[seed].items()), flush=True)
    greedy = [r["greedy return"] for r in results.values()]
    spread = statistics.stdev(greedy) if len(greedy) > 1 else 0.0
    print(f"greedy return over {len(greedy)} seeds: {statistics.mean(greedy):.1f} ± {spread:.1f} (max 500)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--target-every", type=int, default=500)
    options = parser.parse_args()
    main(options.steps, tuple(options.seeds), options.tau, options.target_every)
