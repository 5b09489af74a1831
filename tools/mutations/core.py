"""Mutations of the update path: rules, options, watch, state, swap, allocation, the kernels, the shadow and the plain
storage engine."""

from __future__ import annotations

# The fast tests that cover each module (full files of the slowest modules would take minutes per mutant).
TESTS = {
    "rules.py": ["tests/test_rules.py"],
    "kernels.py": [
        "tests/test_nonfinite.py",
        "tests/test_missing_cases.py",
        "tests/test_flat.py",
        "tests/test_shadow.py",
        "tests/test_kernels_cast.py",
        "tests/test_kernels_rounding.py",
        "tests/test_bema.py",
        "tests/test_combinations.py",
    ],
    "shadow.py": [
        "tests/test_nonfinite.py",
        "tests/test_missing_cases.py",
        "tests/test_shadow.py",
        "tests/test_swap.py",
        "tests/test_bema.py",
        "tests/test_live.py",
        "tests/test_combinations.py",
    ],
    "state.py": ["tests/test_resume.py", "tests/test_arguments.py", "tests/test_state_compat.py"],
    "options.py": ["tests/test_shadow.py", "tests/test_arguments.py", "tests/test_combinations.py"],
    "watch.py": ["tests/test_one_path.py", "tests/test_plan.py", "tests/test_reliability.py"],
    "swap.py": ["tests/test_swap.py", "tests/test_shadow.py"],
    "allocation.py": ["tests/test_kernels_cast.py", "tests/test_shadow.py", "tests/test_live.py"],
    "storage/__init__.py": ["tests/test_zero_adapter.py", "tests/test_shadow.py"],
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
    (
        "state: start ignored in the counter check",  # was front_end.py's
        "state.py",
        'updates = max(0, counters["step"] - start_value) // every',
        'updates = max(0, counters["step"]) // every',
    ),
    (
        "options: buffers value unchecked",
        "options.py",
        '        _choice("buffers", self.buffers, POLICIES, hint)\n',
        "",
    ),
    ("options: frozen value unchecked", "options.py", '        _choice("frozen", self.frozen, POLICIES, hint)\n', ""),
    (
        "options: lazy flag unchecked",
        "options.py",
        'for name in ("include_nonpersistent", "lazy", "watch"):',
        'for name in ("include_nonpersistent", "watch"):',
    ),
    (
        "options: a string taken as patterns",
        "options.py",
        "if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):",
        "if not isinstance(exclude, Iterable):",
    ),
    (
        "options: integer storage dtype accepted",
        "options.py",
        "not (isinstance(dtype, torch.dtype) and dtype.is_floating_point)",
        "not isinstance(dtype, torch.dtype)",
    ),
    (
        "options: stochastic rounding into the default dtype",
        "options.py",
        'if self.rounding == "stochastic" and dtype != torch.bfloat16:',
        'if self.rounding == "stochastic" and dtype is not None and dtype != torch.bfloat16:',
    ),
    (
        "options: frozen policy applied to trainable parameters",
        "options.py",
        'return "average" if found.tensor.requires_grad else self.frozen',
        'return self.frozen if found.tensor.requires_grad else "average"',
    ),
    (
        "options: non-persistent buffers kept by default",
        "options.py",
        "if not found.persistent and not self.include_nonpersistent:",
        "if not found.persistent and self.include_nonpersistent:",
    ),
    (
        "options: integer buffers averaged",
        "options.py",
        'if self.buffers == "skip" or not averageable:',
        'if self.buffers == "skip":',
    ),
    (
        "options: average kept in the model's dtype",
        "options.py",
        "return torch.promote_types(tensor.dtype, torch.float32)",
        "return tensor.dtype",
    ),
    (
        "options: complex average in a real dtype",
        "options.py",
        "return self.dtype.to_complex() if tensor.is_complex() else self.dtype",
        "return self.dtype",
    ),
    (
        "kernels: chunk pieces leave a gap",
        "kernels.py",
        "b = min(n, a + capacity)",
        "b = min(n, a + capacity - 1)",
    ),
    ("kernels: batch fill not counted", "kernels.py", "            used += b - a\n", ""),
    (
        "kernels: tiled source from the tensor's start",
        "kernels.py",
        "source = _flat(self.models[batch[0][0]], offset, batch[0][1])",
        "source = _flat(self.models[batch[0][0]], offset)",
    ),
    (
        "kernels: piece read from the tensor's start",
        "kernels.py",
        "self.models[i].reshape(-1)[a:b] for i, a, b, whole in pieces]",
        "self.models[i].reshape(-1)[: b - a] for i, a, b, whole in pieces]",
    ),
    (
        "kernels: direct path for K averages",
        "kernels.py",
        "self.direct = len(self.averages) == 1 and same",
        "self.direct = len(self.averages) >= 1 and same",
    ),
    (
        "kernels: direct path across dtypes",
        "kernels.py",
        "same = first.dtype == model.dtype and first.device == model.device",
        "same = first.device == model.device",
    ),
    (
        # (Sharing the staged chunk among K guarded averages, a spare only for K > 2, is equivalent: the flag is
        # one for the whole update, so a False flag writes each average's own values over the chunk in turn.
        # Planted instead: the bug the spare's pieces had, every piece at the chunk's start.)
        "kernels: spare pieces all at the chunk's start",
        "kernels.py",
        "views = [out[end - v.numel() : end].view_as(v) for v, end in zip(batch.views, ends, strict=True)]",
        "views = [out[: v.numel()].view_as(v) for v in batch.views]",
    ),
    (
        "kernels: pieces keep flag inverted",
        "kernels.py",
        "torch.where(keep, staged, piece, out=view)",
        "torch.where(keep, piece, staged, out=view)",
    ),
    (
        "kernels: stochastic keep flag inverted",
        "kernels.py",
        "torch.where(keep, batch.staged, wide, out=staged)",
        "torch.where(keep, wide, batch.staged, out=staged)",
    ),
    (
        "kernels: random bits one short",
        "kernels.py",
        "return bits.bitwise_and_(0xFFFF)",
        "return bits.bitwise_and_(0x7FFF)",
    ),
    ("kernels: mix drops the model's share", "kernels.py", "        torch._foreach_mul_(result, mix.model)\n", ""),
    (
        "shadow: lazy start blends into garbage",
        "shadow.py",
        "            weights = (1.0,) * self.count\n        for fold",
        "        for fold",
    ),
    (
        "shadow: a skipped first copy counts as started",
        "shadow.py",
        "self.started = keep is None or bool(keep)",
        "self.started = True",
    ),
    (
        "shadow: swap leaves the average in",
        "shadow.py",
        "                copy_all(live, backup)\n",
        "                pass\n",
    ),
    (
        "shadow: load into the first average",
        "shadow.py",
        "value, held = state[name], slot.values[index]",
        "value, held = state[name], slot.values[0]",
    ),
    (
        "shadow: saved dtype unchecked",
        "shadow.py",
        "if value.shape != slot.values[0].shape or value.dtype != slot.stored[0].dtype:",
        "if value.shape != slot.values[0].shape:",
    ),
    (
        "shadow: buffers get the parameters' mix",
        "shadow.py",
        "chosen[slot.name in parameters or buffers is None]",
        "chosen[slot.name in parameters or buffers is not None]",
    ),
    (
        "shadow: copied tensors follow the parameters' mix",
        "shadow.py",
        "if (buffers if buffers is not None else mix).model == 0.0:",
        "if mix.model == 0.0:",
    ),
    (
        "state: last update counted in updates",
        "state.py",
        '"last_update_step": updates * every',
        '"last_update_step": updates',
    ),
    (
        "state: skipped may exceed updates",
        "state.py",
        'if counters["skipped_updates"] > updates:',
        'if counters["skipped_updates"] > updates + 1:',
    ),
    ("state: averages' count unchecked", "state.py", "if len(saved) != count:", "if len(saved) > count:"),
    ("swap: module stays marked", "swap.py", "        _SWAPPED.discard(target)\n", ""),
    (
        "swap: a deliberate export warns",
        "swap.py",
        "    if _EXPORTS[0]:\n        return\n",
        "    if not _EXPORTS[0]:\n        return\n",
    ),
    (
        "allocation: views overlap",
        "allocation.py",
        "            offset += n\n",
        "",
    ),
    (
        "allocation: channels_last average contiguous",
        "allocation.py",
        "return piece.as_strided(tensor.shape, tensor.stride()) if dense else piece.view(tensor.shape)",
        "return piece.view(tensor.shape)",
    ),
    (
        "allocation: target adopted for stochastic rounding",
        "allocation.py",
        '        and options.rounding == "nearest"\n',
        "",
    ),
    (
        # (Adopting a target on another device than options.device is unobservable on a CPU-only machine, where
        # every tensor is on the CPU: the slip planted is the dtype test's, against the model's dtype instead.)
        "allocation: target adopted in the model's dtype",
        "allocation.py",
        "and theirs[f.name].dtype == options.storage_dtype(f.tensor, mode)",
        "and theirs[f.name].dtype == f.tensor.dtype",
    ),
    (
        "storage: the plain engine claims first",
        "storage/__init__.py",
        "return [DTensorEngine(), ZeroEngine(), PLAIN]",
        "return [PLAIN, DTensorEngine(), ZeroEngine()]",
    ),
    (
        "storage: FSDP1's mark misspelt",
        "storage/__init__.py",
        'if getattr(tensor, "_fsdp_flattened", False):',
        'if getattr(tensor, "_fsdp_flat", False):',
    ),
    (
        "watch: a new .data is not noticed",
        "watch.py",
        "if before is None or _layout(tensor) != before:",
        "if before is None:",
    ),
    (
        "watch: requires_grad_ not noticed",
        "watch.py",
        "        result = requires_grad_(tensor, requires_grad)\n"
        "        if grad_flag.__get__(tensor) != before:\n"
        "            _tensor_changed(tensor)\n",
        "        result = requires_grad_(tensor, requires_grad)\n",
    ),
    (
        "watch: del not noticed",
        "watch.py",
        "        delattr_(self, name)\n        _module_changed(self)\n",
        "        delattr_(self, name)\n",
    ),
    (
        "watch: a None parameter not noticed",
        "watch.py",
        "        register_parameter(self, name, param)\n        if param is None:",
        "        register_parameter(self, name, param)\n        if param is not None:",
    ),
    ("watch: the mark never clears", "watch.py", "            self.dirty = False\n", ""),
    (
        "watch: hooks outlive the last watcher",
        "watch.py",
        "        _USERS[0] -= 1\n        if not _USERS[0]:",
        "        _USERS[0] -= 1\n        if _USERS[0] < 0:",
    ),
]
