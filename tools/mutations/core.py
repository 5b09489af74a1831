"""Mutations of the core modules: rules, kernels, the shadow, the front ends, BatchNorm, swa_utils, post-hoc, io."""

from __future__ import annotations

# The fast tests that cover each module (full files of the slowest modules would take minutes per mutant).
TESTS = {
    "rules.py": ["tests/test_rules.py"],
    "kernels.py": ["tests/test_nonfinite.py", "tests/test_missing_cases.py", "tests/test_flat.py"],
    "shadow.py": ["tests/test_nonfinite.py", "tests/test_missing_cases.py", "tests/test_shadow.py"],
    "ema.py": [
        "tests/test_ema.py::test_front_end_matches_float64_loop",
        "tests/test_resume.py",
        "tests/test_nonfinite.py",
        "tests/test_swap.py",
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
    "state.py": ["tests/test_resume.py", "tests/test_arguments.py", "tests/test_state_compat.py"],
}

# (name, module, snippet, replacement): plausible slips, each a one-line change.
MUTATIONS: list[tuple[str, str, str, str]] = [
    (
        "rules: constant decay over delta-1 steps",
        "rules.py",
        "return self.decay**delta",
        "return self.decay ** (delta - 1)",
    ),
    ("rules: first update does not copy", "rules.py", "if delta == step:", "if delta == step == 1:"),
    (
        "rules: debiased decay off by one",
        "rules.py",
        "return d * (1.0 - d ** (j - 1)) / (1.0 - d**j)",
        "return d * (1.0 - d**j) / (1.0 - d**j)",
    ),
    ("rules: rational warm-up offset 9", "rules.py", "(1.0 + n) / (10.0 + n)", "(1.0 + n) / (9.0 + n)"),
    (
        "rules: power warm-up ignores min_decay",
        "rules.py",
        "min(max(value, self.min_decay), self.decay)",
        "min(value, self.decay)",
    ),
    (
        "rules: power warm-up n = j",
        "rules.py",
        "n = max(0, j - 1 + self.offset)",
        "n = max(0, j + self.offset)",
    ),
    (
        "rules: power function exponent gamma",
        "rules.py",
        "return (1.0 - delta / step) ** (self.gamma + 1.0)",
        "return (1.0 - delta / step) ** self.gamma",
    ),
    (
        "rules: power function decay_at exponent",
        "rules.py",
        "return (1.0 - 1.0 / j) ** (self.gamma + 1.0)",
        "return (1.0 - 1.0 / j) ** self.gamma",
    ),
    (
        "rules: equal weights over step+1",
        "rules.py",
        "return (step - delta) / step",
        "return (step - delta) / (step + 1)",
    ),
    ("rules: equal weights decay_at", "rules.py", "return (j - 1) / j", "return (j - 1) / (j + 1)"),
    (
        "rules: half-life without the inverse",
        "rules.py",
        "decay = 0.5 ** (1.0 / half_life)",
        "decay = 0.5 ** (2.0 / half_life)",
    ),
    ("rules: sigma_rel formula", "rules.py", "/ (g + 3.0)) / (g + 2.0)", "/ (g + 3.0)) / (g + 1.0)"),
    ("rules: decay 1 accepted", "rules.py", "low=0.0, high=1.0, high_open=True", "low=0.0, high=1.0"),
    (
        "kernels: finite check accepts inf",
        "kernels.py",
        "return torch.stack(norms).lt(math.inf).all()",
        "return torch.stack(norms).le(math.inf).all()",
    ),
    (
        "kernels: finite check in the input dtype",
        "kernels.py",
        "norms = torch._foreach_norm(tensors, 2, dtype=wide)",
        "norms = torch._foreach_norm(tensors, 2)",
    ),
    (
        "kernels: staged lerp by 1 - w",
        "kernels.py",
        "target.lerp_(staged, weight)",
        "target.lerp_(staged, 1 - weight)",
    ),
    (
        "kernels: staged pieces lerp by 1 - w",
        "kernels.py",
        "_lerp(target, views, weight)",
        "_lerp(target, views, 1 - weight)",
    ),
    (
        "kernels: keep flag inverted",
        "kernels.py",
        "torch.where(keep, batch.staged, target, out=out)",
        "torch.where(keep, target, batch.staged, out=out)",
    ),
    (
        "kernels: overlap folds the batch in flight",
        "kernels.py",
        "self._fold(number - 1, weights, keep)",
        "self._fold(number, weights, keep)",
    ),
    (
        "kernels: merge ignores the model layout",
        "kernels.py",
        "            and _adjacent(models[stop - 1], models[stop])\n",
        "",
    ),
    (
        "kernels: copy when the weight is large",
        "kernels.py",
        "copy = not isinstance(weight, Tensor) and weight == 1.0",
        "copy = not isinstance(weight, Tensor) and weight >= 0.5",
    ),
    (
        "shadow: raise checks copied tensors",
        "shadow.py",
        'if slot.mode == "average" and not bool(all_finite([tensor])):',
        'if slot.mode == "copy" and not bool(all_finite([tensor])):',
    ),
    (
        "shadow: skip leaves copies stale",
        "shadow.py",
        "            fold.run(weights, keep)\n        plan.copy()\n",
        "            fold.run(weights, keep)\n",
    ),
    (
        # The shadow's own copy path for a weight of 1.0 is gone: the kernels copy (exact, blind to garbage).
        "kernels: weight 1 lerps",
        "kernels.py",
        "    elif weight == 1.0:\n        torch._foreach_copy_(targets, sources)\n",
        "",
    ),
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
        "state: start ignored in the counter check",  # was front_end.py's
        "state.py",
        'updates = max(0, counters["step"] - start_value) // every',
        'updates = max(0, counters["step"]) // every',
    ),
]
