"""Mutations of the newer modules: change detection (watch, plan), live targets, Switch EMA, durations, MultiEMA,
random streams, file bounds (io), the trainer callbacks, PEFT export, the offload loop, PostHocEMA's start, ZeRO-3
partitions and the argument checks.

Names start with an area prefix that core.py does not use, so that ``--only`` picks them: watch, plan, live,
switch, durations, multi, streams, torch_files, safetensors, transformers, lightning, pretrained, overlap,
tracker, zero3, checks. Each area's new tests are in tests/test_weak_spots_*.py.
"""

from __future__ import annotations

TESTS = {
    "watch.py": ["tests/test_weak_spots_changes.py"],
    "plan.py": ["tests/test_weak_spots_changes.py", "tests/test_live.py"],
    "live.py": ["tests/test_weak_spots_live.py", "tests/test_live.py"],
    "ema.py": ["tests/test_weak_spots_live.py::test_switch_blend_moves_the_model_toward_the_average"],
    "durations.py": ["tests/test_durations.py"],
    "multi.py": ["tests/test_live_multi.py", "tests/test_weak_spots_multi.py"],
    "front_end.py": ["tests/test_weak_spots_multi.py", "tests/test_weak_spots_streams.py"],
    "streams.py": ["tests/test_kernels_rounding.py", "tests/test_weak_spots_streams.py"],
    "io/torch_files.py": ["tests/test_weak_spots_io.py", "tests/test_io.py"],
    "io/safetensors.py": ["tests/test_weak_spots_io.py"],
    "integrations/transformers.py": [
        "tests/test_weak_spots_callbacks.py::test_transformers_resume_prefers_the_named_checkpoint"
    ],
    "integrations/lightning.py": [
        "tests/test_weak_spots_callbacks.py::test_lightning_callbacks_see_the_training_weights_on_exception"
    ],
    "pretrained.py": [
        "tests/test_weak_spots_callbacks.py::test_adapter_names_pair_only_when_unambiguous",
        "tests/test_weak_spots_callbacks.py::test_export_of_an_average_of_two_adapters_names_the_ambiguous_tensor",
    ],
    "kernels.py": ["tests/test_missing_cases.py::test_overlapped_staging_matches_float64_with_an_asymmetric_weight"],
    "posthoc/tracker.py": ["tests/test_weak_spots_streams.py::test_posthoc_start_step_is_a_setting_a_state_must_match"],
    "storage/zero3.py": ["tests/test_zero_adapter.py"],
    "checks.py": ["tests/test_durations.py", "tests/test_arguments.py"],
}

# (name, module, snippet, replacement): plausible slips, each a one-line change.
MUTATIONS: list[tuple[str, str, str, str]] = [
    # (a) change detection of conversions
    ("watch: swap_tensors tells only the second tensor", "watch.py", "        _tensor_changed(t1)\n", ""),
    ("watch: swap_tensors tells only the first tensor", "watch.py", "        _tensor_changed(t2)\n", ""),
    (
        "watch: _apply misses replaced buffers",
        "watch.py",
        "if any(map(operator.is_not, before,",
        "if not any(map(operator.is_not, before,",
    ),
    (
        "watch: a data layout without its dtype",
        "watch.py",
        "return tensor.data_ptr(), tensor.dtype, tensor.shape,",
        "return tensor.data_ptr(), tensor.shape,",
    ),
    (
        "watch: set .data marks only unreadable layouts",
        "watch.py",
        "if before is None or _layout(tensor) != before:",
        "if before is None:",
    ),
    (
        "plan: non-persistent buffer sets not counted",
        "plan.py",
        "plan.count = len(plan.keys) + sum(map(len, plan.sets))",
        "plan.count = len(plan.keys)",
    ),
    (
        "plan: which buffers are non-persistent not compared",
        "plan.py",
        "        if list(map(frozenset, self.sets)) != self.persistence:",
        "        if False:",
    ),
    (
        "plan: re-check ignores the dtype",
        "plan.py",
        "return tensor.dtype, tensor.shape, tensor.stride(), tensor.device, tensor.requires_grad",
        "return tensor.shape, tensor.stride(), tensor.device, tensor.requires_grad",
    ),
    # (b) a live target's own requires_grad
    ("live: the target left trainable", "live.py", "    unwrap(module).requires_grad_(False)\n", ""),
    (
        "live: the online model frozen instead of the target",
        "live.py",
        "    unwrap(module).requires_grad_(False)\n",
        "    unwrap(model).requires_grad_(False)\n",
    ),
    (
        "live: a target of another dtype adopted",
        "live.py",
        "if other.shape != f.tensor.shape or other.dtype != f.tensor.dtype:",
        "if other.shape != f.tensor.shape:",
    ),
    # (c) the direction of a Switch EMA partial blend
    (
        "switch: the blend moves the average's share the wrong way",
        "ema.py",
        "Mix(1.0 - blend, (blend,))",
        "Mix(blend, (1.0 - blend,))",
    ),
    # (d) duration parsing
    (
        "durations: unit names case-sensitive",
        "durations.py",
        "_UNITS.get(match.group(3).lower())",
        "_UNITS.get(match.group(3))",
    ),
    ("durations: G is a million", "durations.py", '"G": 1e9', '"G": 1e6'),
    ("durations: T is a billion", "durations.py", '"T": 1e12', '"T": 1e9'),
    ("durations: capital K unknown", "durations.py", '"k": 1e3, "K": 1e3,', '"k": 1e3,'),
    ("durations: G not parsed", "durations.py", r"([kKMBGT]?)", r"([kKMBT]?)"),
    # (e) MultiEMA
    (
        "multi: names rounded to 4 digits",
        "multi.py",
        'return repr(float(decay)).replace(".", "_")',
        'return f"{float(decay):.4f}".replace(".", "_")',
    ),
    (
        "multi: every average is the first",
        "multi.py",
        "self.multi, self.name, self.index = multi, name, list(multi.rules).index(name)",
        "self.multi, self.name, self.index = multi, name, 0",
    ),
    (
        "multi: (front_end) load checks the first average only",
        "front_end.py",
        "            for saved in averages:\n                shadow.check_state_dict(saved)",
        "            for saved in averages[:1]:\n                shadow.check_state_dict(saved)",
    ),
    (
        "multi: a format /1 state of mixed steps upgraded",
        "multi.py",
        "if any(part.get(key) != first.get(key) for key in keys):",
        "if any(part.get(key) != first.get(key) for key in keys[1:]):",
    ),
    (
        "multi: an average's skipped count is the update count",
        "multi.py",
        "        return self.multi.skipped_updates\n",
        "        return self.multi.num_updates - self.multi.num_updates\n",
    ),
    # (f) random streams
    (
        "streams: not seeded from torch's seed",
        "streams.py",
        "torch.Generator(device).manual_seed(torch.initial_seed())",
        "torch.Generator(device)",
    ),
    (
        "streams: (front_end) a lazy resume keeps its fresh streams",
        "front_end.py",
        'if shadow is not None and shadow.options.rounding != "nearest":',
        'if self._shadow is not None and shadow.options.rounding != "nearest":',
    ),
    (
        "streams: a checked state not set",
        "streams.py",
        "            for device, value in state.items():\n                self[device].set_state(value)",
        "            for device, value in state.items():\n                pass",
    ),
    # (g) file bounds
    ("torch_files: CRC of the last piece only", "io/torch_files.py", "crc = crc32(piece, crc)", "crc = crc32(piece)"),
    (
        "torch_files: bound on the largest member only",
        "io/torch_files.py",
        "declared = sum(m.file_size for m in members)",
        "declared = max((m.file_size for m in members), default=0)",
    ),
    (  # (a member running past the file's end is refused either way, as truncated or as cut short: not used)
        "torch_files: a deflated member read in one piece only",
        "io/torch_files.py",
        "            while stream.read(_PIECE):",
        "            if stream.read(_PIECE):",
    ),
    (
        "safetensors: header length not bounded",
        "io/safetensors.py",
        "if not 0 < length <= min(size - 8, MAX_HEADER):",
        "if not 0 < length <= size - 8:",
    ),
    (
        "safetensors: a header filling the file refused",
        "io/safetensors.py",
        "if not 0 < length <= min(size - 8, MAX_HEADER):",
        "if not 0 < length < min(size - 8, MAX_HEADER):",
    ),
    ("safetensors: tensor CRC restarted per piece", "io/safetensors.py", "crc = crc32(data, crc)", "crc = crc32(data)"),
    # (h) the transformers callback's resume path
    (
        "transformers: output_dir before resume_from_checkpoint",
        "integrations/transformers.py",
        "places.insert(0, Path(args.resume_from_checkpoint))",
        "places.append(Path(args.resume_from_checkpoint))",
    ),
    (
        "transformers: a state of another step loaded",
        "integrations/transformers.py",
        'if saved.get("global_step") != step:',
        'if saved.get("global_step") is None:',
    ),
    # (i) the Lightning callback's swap closed in finally
    (
        "lightning: the averaged pass closes its swap on success only",
        "integrations/lightning.py",
        "            getattr(trainer.strategy, step)(*args)\n        finally:\n            self._swap_out()\n",
        "            getattr(trainer.strategy, step)(*args)\n            self._swap_out()\n        finally:\n",
    ),
    # (j) ambiguous adapter names
    (
        "pretrained: an ambiguous adapter name taken",
        "pretrained.py",
        "elif len(widened.get(name, ())) == 1:",
        "elif widened.get(name):",
    ),
    (
        "pretrained: the exact name not preferred",
        "pretrained.py",
        "        if name in have:\n",
        "        if name in have and name not in widened:\n",
    ),
    # (k) the overlapped offload loop
    (
        "overlap: the last batch not folded",
        "kernels.py",
        "self._fold(len(self.batches) - 1, weights, keep)",
        "self._fold(len(self.batches) - 2, weights, keep)",
    ),
    (
        "overlap: one staging buffer for the batch in flight and the one folded",
        "kernels.py",
        "for _ in range(2 if self.overlap else 1)",
        "for _ in range(1)",
    ),
    # (l) PostHocEMA's start_step
    (
        "tracker: start_step not a saved setting",
        "posthoc/tracker.py",
        '            "start_step": self.start_step,\n            "snapshot_every"',
        '            "snapshot_every"',
    ),
    # ZeRO-3 partitions, argument checks
    ("zero3: the padding averaged", "storage/zero3.py", "return stored.narrow(0, 0, valid)", "return stored"),
    (
        "zero3: partition size rounded down",
        "storage/zero3.py",
        "    k = -(-int(p.ds_numel) // world)\n    return",
        "    k = int(p.ds_numel) // world\n    return",
    ),
    (
        "checks: an open lower bound taken as closed",
        "checks.py",
        "(number <= low if low_open else number < low)",
        "(number < low)",
    ),
    (
        "checks: a bool taken as an int",
        "checks.py",
        '    expected = f"an int >= {low}"\n    given = plain(value)\n    if isinstance(given, bool) or not',
        '    expected = f"an int >= {low}"\n    given = plain(value)\n    if not',
    ),
]
