"""Mutations of the front ends and what they write: EMA, BEMA, the declared-state base, BatchNorm, swa_utils,
post-hoc (tracker, fit, synthesis, snapshots), safetensors io."""

from __future__ import annotations

# The fast tests that cover each module (full files of the slowest modules would take minutes per mutant).
TESTS = {
    "ema.py": [
        "tests/test_ema.py",
        "tests/test_resume.py",
        "tests/test_nonfinite.py",
        "tests/test_swap.py",
        "tests/test_live.py",
        "tests/test_live_multi.py::test_switch_ema_writes_the_average_back",
    ],
    "bema.py": ["tests/test_bema.py"],
    "bn.py": ["tests/test_bn.py", "tests/distributed/test_update_bn_ranks.py"],
    "swa_utils.py": ["tests/test_missing_cases.py", "tests/test_swa_utils.py"],
    "posthoc/tracker.py": ["tests/test_missing_cases.py", "tests/test_posthoc.py"],
    "io/safetensors.py": ["tests/test_missing_cases.py", "tests/test_io.py"],
    "front_end.py": [
        "tests/test_ema.py",
        "tests/test_missing_cases.py",
        "tests/test_nonfinite.py",
        "tests/test_arguments.py",
        "tests/test_resume.py",
        "tests/test_swap.py",
    ],
    "posthoc/fit.py": ["tests/test_posthoc.py"],
    "posthoc/synthesis.py": ["tests/test_posthoc.py"],
    "posthoc/snapshots.py": ["tests/test_posthoc.py"],
}

# (name, module, snippet, replacement): plausible slips, each a one-line change.
MUTATIONS: list[tuple[str, str, str, str]] = [
    # Time since the start and the skip counter now live in the front ends' shared base.
    (
        "front_end: time counts from 0",
        "front_end.py",
        "t = self.step + 1 - self._begin",
        "t = self.step - self._begin",
    ),
    (
        "ema: one step per update",  # (delta = update_every would be equivalent: updates are on a grid)
        "ema.py",
        "weight_of(self.rule, t, t - self.last_update_step,",
        "weight_of(self.rule, t, 1,",
    ),
    ("front_end: skip counter counts applied", "front_end.py", "self._skipped + ~applied", "self._skipped + applied"),
    (
        "bema: gamma and rho swapped",
        "bema.py",
        "return (self.rho + self.gamma * s) ** -self.kappa",
        "return (self.gamma + self.rho * s) ** -self.kappa",
    ),
    ("bema: EMA weight 1 - beta", "bema.py", "min(1.0, self.beta(s))", "1.0 - min(1.0, self.beta(s))"),
    ("bema: anchor one step late", "bema.py", "if s == 0:", "if s == 1:"),
    (
        "bema: alpha uses kappa",
        "bema.py",
        "(self.rho + self.gamma * s) ** -self.eta",
        "(self.rho + self.gamma * s) ** -self.kappa",
    ),
    (
        "bn: ranks pooled by batches under sample weighting",
        "bn.py",
        "weight = count if not by_sample else max(seen.values(), default=count)",
        "weight = count",
    ),
    (
        "bn: momentum ignores the batch size",
        "bn.py",
        "module.momentum = weight / seen[module] if weight else 0.0",
        "module.momentum = 1 / len(seen) if weight else 0.0",
    ),
    ("bn: statistics not reset", "bn.py", "                m.reset_running_stats()\n", "                pass\n"),
    (
        "swa_utils: EMA helper weight is the decay",
        "swa_utils.py",
        "return 1.0 - self.rule.decay",
        "return self.rule.decay",
    ),
    (
        "swa_utils: SWA helper over n + 2",
        "swa_utils.py",
        "return 1.0 / (num_averaged + 1)",
        "return 1.0 / (num_averaged + 2)",
    ),
    (
        "posthoc: snapshot optimizer_step",
        "posthoc/tracker.py",
        '"optimizer_step": str(self.start_step + self.last_update_step)',
        '"optimizer_step": str(self.last_update_step)',
    ),
    (
        "front_end: start step ignored",  # was posthoc/tracker.py's own clock; every front end's start is here now
        "front_end.py",
        "self._begin = int(getattr(self, self.SPEC.start))",
        "self._begin = 0",
    ),
    (
        "io: tensors in the given order",
        "io/safetensors.py",
        "names = sorted(specs, key=lambda n: -specs[n].dtype.itemsize)",
        "names = list(specs)",
    ),
    (
        "io: header padding",
        "io/safetensors.py",
        'return blob + b" " * (-len(blob) % 8)',
        'return blob + b" " * (len(blob) % 8)',
    ),
    (
        "front_end: a refused lazy start keeps its storage",
        "front_end.py",
        '                if fresh:  # a refused first update (nonfinite="raise") leaves a lazy averager as it was\n'
        "                    self._shadow = None\n",
        "",
    ),
    ("front_end: averaged model trainable", "front_end.py", "        duplicate.requires_grad_(False)\n", ""),
    (
        "front_end: a loaded state is always started",
        "front_end.py",
        'shadow.started = state.get("started", True) is not False',
        "shadow.started = True",
    ),
    (
        "ema: uncompensated weight compounded",
        "ema.py",
        "return 1.0 - rule.decay_at(t)\n",
        "return 1.0 - rule.decay_at(t) ** delta\n",
    ),
    (
        "ema: tau taken as the decay",
        "ema.py",
        "rule = ConstantDecay(1.0 - _check_tau(tau))",
        "rule = ConstantDecay(_check_tau(tau))",
    ),
    ("ema: switch blend reversed", "ema.py", "Mix(1.0 - blend, (blend,))", "Mix(blend, (1.0 - blend,))"),
    (
        "ema: live target starts one step late",
        "ema.py",
        "if t == 0 and self.target is not None:",
        "if t == 1 and self.target is not None:",
    ),
    (
        "bema: alpha at the current step",
        "bema.py",
        "alpha = self.alpha(self.last_update_step)",
        "alpha = self.alpha(self.step)",
    ),
    (
        "bema: buffers extrapolated",
        "bema.py",
        "return Mix(alpha, (1.0, -alpha)), Mix.copy(0, 2)",
        "return Mix(alpha, (1.0, -alpha)), None",
    ),
    ("fit: columns not normalised", "posthoc/fit.py", "    x /= x.sum(axis=0, keepdims=True)\n", ""),
    (
        "fit: inner product with the earlier profile's exponent",
        "posthoc/fit.py",
        "g = np.where(ta <= tb, gb, ga)",
        "g = np.where(ta <= tb, ga, gb)",
    ),
    (
        "fit: snapshot at the target step left out",
        "posthoc/fit.py",
        "used = t <= target_step",
        "used = t < target_step",
    ),
    (
        "synthesis: copied tensors from the first snapshot",
        "posthoc/synthesis.py",
        "last = snapshots[used[-1]]",
        "last = snapshots[used[0]]",
    ),
    (
        "synthesis: a step between snapshots accepted",
        "posthoc/synthesis.py",
        "if not force and step not in steps:",
        "if not force and step > steps[-1]:",
    ),
    (
        "synthesis: sums carried over",
        "posthoc/synthesis.py",
        "totals = sums[:, : stop - start].zero_()",
        "totals = sums[:, : stop - start]",
    ),
    (
        "snapshots: step 0 accepted",
        "posthoc/snapshots.py",
        "if not 0 < snapshot.step < 2**63:",
        "if not 0 <= snapshot.step < 2**63:",
    ),
    (
        "snapshots: only the first profile's tensors checked",
        "posthoc/snapshots.py",
        'keys = [f"{k}/{name}" for k in range(len(snapshot.sigma_rels)) for name in snapshot.names]',
        'keys = [f"0/{name}" for name in snapshot.names]',
    ),
]
