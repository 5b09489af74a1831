"""Mutations of the one path's reads and of where stochastic rounding's bits come from (kernels.py)."""

from __future__ import annotations

TESTS = {
    "kernels.py": ["tests/test_random_bits.py", "tests/test_one_path.py", "tests/test_kernels_cast.py"],
}

MUTATIONS: list[tuple[str, str, str, str]] = [
    (
        "one path: K averages staged again",
        "kernels.py",
        "self.staging = not (same and generator is None and not guard)",
        "self.staging = True",
    ),
    (
        "one path: an unstaged flat average read against the empty scratch",
        "kernels.py",
        "if contiguous and flat is not None and (self.staging or source is not None):",
        "if contiguous and flat is not None:",
    ),
    (
        "bits: period shorter than a chunk",
        "kernels.py",
        "self.period = 1 << max(16, (capacity - 1).bit_length())",
        "self.period = 1 << max(16, (capacity - 1).bit_length() - 1)",
    ),
    (
        "bits: table of 15-bit values",
        "kernels.py",
        ".remainder_(1 << 16).to(torch.int32)",
        ".remainder_(1 << 15).to(torch.int32)",
    ),
    (
        "bits: every chunk at the first chunk's offset",
        "kernels.py",
        "offset = self.offsets[average][chunk]",
        "offset = self.offsets[average][0]",
    ),
    (
        "bits: every average at the first average's offset",
        "kernels.py",
        "offset = self.offsets[average][chunk]",
        "offset = self.offsets[0][chunk]",
    ),
    (
        "bits: hash without its xorshift",
        "kernels.py",
        "bits.bitwise_xor_(mixing).mul_(_MIX[1])",
        "bits.mul_(_MIX[1])",
    ),
    (
        "bits: hash of the key alone",
        "kernels.py",
        "torch.add(self.pattern[:n], self.draws[average, chunk], out=bits)",
        "torch.add(self.pattern[:n], 0, out=bits)",
    ),
]
